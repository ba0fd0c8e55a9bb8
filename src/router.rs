//! Callback × RuleSet → deliveries. Pure: no network, no disk, no clock but the callback's own.
//!
//! `serve`, `explain` and `test` all call [`route`], so what a dry run shows is what the
//! server does. Every route is evaluated (fan-out across routes); the verdict of each is kept so
//! `explain` can say why a route did not fire.

use bytes::Bytes;
use rhai::{Dynamic, ImmutableString, Map};

use crate::delivery::Delivery;
use crate::dialect::Callback;
use crate::rules::{Route, RuleSet};
use crate::script::{self, Constants, RunError, ScriptEngine, Stage, TransformOutput, Vars};

/// What one route made of a callback.
#[derive(Debug)]
pub enum Verdict {
    /// The route listens to other sources.
    OtherSource,
    /// No `commands` glob matches.
    OtherCommand,
    /// The filter returned false.
    FilteredOut,
    /// The transform returned `()`.
    Dropped,
    /// A filter or transform failed at runtime; the route delivers nothing for this callback.
    Failed(RunError),
    /// The route fires with this body.
    Deliver(Payload),
}

/// The body a firing route sends.
#[derive(Clone, Debug)]
pub enum Payload {
    /// The callback's bytes, untouched.
    Original,
    /// The transform's JSON.
    Transformed(Bytes),
}

/// One route's verdict.
#[derive(Debug)]
pub struct RouteResult<'r> {
    pub route: &'r Route,
    /// Filter result when the filter ran.
    pub filter: Option<bool>,
    pub verdict: Verdict,
}

/// The synchronous route answering a callback, and what it sends its target.
#[derive(Debug)]
pub struct Responder<'r> {
    pub route: &'r Route,
    /// `Err`: the route's filter or transform failed, so the fallback answers.
    pub delivery: Result<Delivery, RunError>,
}

/// Every route's verdict for one callback, in evaluation order.
#[derive(Debug)]
pub struct Routing<'r> {
    pub results: Vec<RouteResult<'r>>,
    /// The synchronous route that answers this callback: the first `respond: true` route that
    /// fired or whose script failed. Its delivery is sent at once, not queued.
    pub responder: Option<usize>,
    /// The scripts' scope, when a scripted route needed it (a `response_transform` reuses it).
    vars: Option<Result<Vars, RunError>>,
}

impl<'r> Routing<'r> {
    /// The deliveries to queue: one per (route, target) of every firing route but the responder.
    pub fn deliveries(&self, callback: &Callback) -> Vec<Delivery> {
        let mut out = Vec::new();
        for (i, result) in self.results.iter().enumerate() {
            if Some(i) != self.responder {
                out.extend(deliveries_of(result, callback));
            }
        }
        out
    }

    /// The synchronous route that answers this callback, if one fired or failed.
    pub fn responder(&self, callback: &Callback) -> Option<Responder<'r>> {
        let result = &self.results[self.responder?];
        let delivery = match &result.verdict {
            Verdict::Failed(e) => Err(e.clone()),
            _ => Ok(deliveries_of(result, callback)
                .next()
                .expect("a firing respond route has one target")),
        };
        Some(Responder {
            route: result.route,
            delivery,
        })
    }

    /// The scope scripts see for this callback, built at most once.
    pub fn vars(&mut self, callback: &Callback) -> Result<&Vars, RunError> {
        match self.vars.get_or_insert_with(|| scope_vars(callback)) {
            Ok(v) => Ok(v),
            Err(e) => Err(e.clone()),
        }
    }

    pub fn errors(&self) -> impl Iterator<Item = (&Route, &RunError)> {
        self.results.iter().filter_map(|r| match &r.verdict {
            Verdict::Failed(e) => Some((r.route, e)),
            _ => None,
        })
    }
}

fn deliveries_of<'a>(
    result: &'a RouteResult<'_>,
    callback: &'a Callback,
) -> impl Iterator<Item = Delivery> + 'a {
    let payload = match &result.verdict {
        Verdict::Deliver(payload) => Some(payload),
        _ => None,
    };
    let (body, content_type) = match payload {
        Some(Payload::Transformed(bytes)) => (bytes.clone(), None),
        _ => (callback.body.clone(), callback.content_type.clone()),
    };
    let targets = if payload.is_some() {
        &result.route.to[..]
    } else {
        &[]
    };
    targets.iter().map(move |target| {
        Delivery::new(
            callback,
            result.route.name.clone(),
            target.clone(),
            body.clone(),
            content_type.clone(),
        )
    })
}

/// Routes a callback through the rule set.
pub fn route<'r>(callback: &Callback, rules: &'r RuleSet, engine: &ScriptEngine) -> Routing<'r> {
    let mut vars: Option<Result<Vars, RunError>> = None;
    let results: Vec<RouteResult<'r>> = rules
        .routes
        .iter()
        .map(|route| {
            let (filter, verdict) = evaluate(callback, route, engine, &mut vars);
            RouteResult {
                route,
                filter,
                verdict,
            }
        })
        .collect();
    let responder = results.iter().position(|r| {
        r.route.respond && matches!(r.verdict, Verdict::Deliver(_) | Verdict::Failed(_))
    });
    Routing {
        results,
        responder,
        vars,
    }
}

/// Routes a callback through one route of the rule set (replaying a dead letter of that route).
pub fn route_one<'r>(callback: &Callback, route: &'r Route, engine: &ScriptEngine) -> Routing<'r> {
    let mut vars = None;
    let (filter, verdict) = evaluate(callback, route, engine, &mut vars);
    // A replay queues the delivery like any other, synchronous route or not: the IM server's
    // wait is long over.
    Routing {
        results: vec![RouteResult {
            route,
            filter,
            verdict,
        }],
        responder: None,
        vars,
    }
}

fn evaluate(
    callback: &Callback,
    route: &Route,
    engine: &ScriptEngine,
    vars: &mut Option<Result<Vars, RunError>>,
) -> (Option<bool>, Verdict) {
    if !route.selects_source(&callback.source.name) {
        return (None, Verdict::OtherSource);
    }
    if !route.selects_command(&callback.command) {
        return (None, Verdict::OtherCommand);
    }
    if route.filter.is_none() && route.transform.is_none() {
        return (None, Verdict::Deliver(Payload::Original));
    }
    // The scope is built once per callback, and only when a scripted route needs it.
    let vars = match vars.get_or_insert_with(|| scope_vars(callback)) {
        Ok(v) => v,
        Err(e) => return (None, Verdict::Failed(e.clone())),
    };
    let mut filter_result = None;
    if let Some(filter) = &route.filter {
        match engine.filter(&route.name, filter, vars) {
            Ok(true) => filter_result = Some(true),
            Ok(false) => return (Some(false), Verdict::FilteredOut),
            Err(e) => return (None, Verdict::Failed(e)),
        }
    }
    let verdict = match &route.transform {
        None => Verdict::Deliver(Payload::Original),
        Some(transform) => match engine.transform(&route.name, transform, vars) {
            Ok(TransformOutput::Body(bytes)) => {
                Verdict::Deliver(Payload::Transformed(bytes.into()))
            }
            Ok(TransformOutput::Skip) => Verdict::Dropped,
            Err(e) => Verdict::Failed(e),
        },
    };
    (filter_result, verdict)
}

fn scope_vars(callback: &Callback) -> Result<Vars, RunError> {
    let body = script::json_to_dynamic(&callback.body).map_err(|e| RunError {
        stage: Stage::Filter,
        message: format!("the body cannot be given to scripts: {e}"),
        location: None,
    })?;
    let to_map = |pairs: &[(String, String)]| -> Map {
        let mut map = Map::new();
        for (k, v) in pairs {
            // The first value of a repeated name wins, as with most web frameworks.
            map.entry(k.as_str().into())
                .or_insert_with(|| Dynamic::from(ImmutableString::from(v.as_str())));
        }
        map
    };
    Ok(Vars::new(
        body,
        Constants {
            command: (&*callback.command).into(),
            source: (&*callback.source.name).into(),
            dialect: callback.source.dialect.as_str().into(),
            app_id: callback.app_id.as_str().into(),
            query: to_map(&callback.query),
            headers: to_map(&callback.headers),
            event_id: (&*callback.event_id).into(),
            received_at: callback.received_at as i64,
        },
    ))
}
