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
use crate::script::{
    self, Constants, Reads, RunError, Script, ScriptEngine, Stage, TransformOutput, Vars,
};

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
    /// What the scripts that may run on this callback read.
    reads: Reads,
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
        let reads = self.reads;
        match self.vars.get_or_insert_with(|| scope_vars(callback, reads)) {
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
    evaluate_all(callback, &rules.routes, rules.reads, engine)
}

/// Routes a callback through one route of the rule set (replaying a dead letter of that route).
pub fn route_one<'r>(callback: &Callback, route: &'r Route, engine: &ScriptEngine) -> Routing<'r> {
    let mut routing = evaluate_all(callback, std::slice::from_ref(route), route.reads(), engine);
    // A replay queues the delivery like any other, synchronous route or not: the IM server's
    // wait is long over.
    routing.responder = None;
    routing
}

fn evaluate_all<'r>(
    callback: &Callback,
    routes: &'r [Route],
    reads: Reads,
    engine: &ScriptEngine,
) -> Routing<'r> {
    let mut vars: Option<Result<Vars, RunError>> = None;
    let last = last_body_reader(callback, routes);
    let results: Vec<RouteResult<'r>> = routes
        .iter()
        .enumerate()
        .map(|(i, route)| {
            let given = Given {
                reads,
                last: last == Some(i),
            };
            let (filter, verdict) = evaluate(callback, route, engine, &mut vars, given);
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
        reads,
    }
}

/// The route whose filter or transform is the last script to read `body` for this callback,
/// which may then have the callback's own instead of a copy; `None` when no script reads it, or
/// when a `response_transform` may (it runs after every route).
fn last_body_reader(callback: &Callback, routes: &[Route]) -> Option<usize> {
    let reads = |script: &Option<Script>| script.as_ref().is_some_and(|s| s.reads.body);
    let mut last = None;
    for (i, route) in routes.iter().enumerate() {
        // The scripts' flags first: only a route that reads `body` costs a match here.
        let answers = reads(&route.response_transform);
        if !(answers || reads(&route.filter) || reads(&route.transform))
            || !route.selects_source(&callback.source.name)
            || !route.selects_command(&callback.command)
        {
            continue;
        }
        if answers {
            return None;
        }
        last = Some(i);
    }
    last
}

/// What a route's scripts are given: the values built for the callback's scripts, and whether
/// this route's scripts are the last to read `body`.
#[derive(Clone, Copy)]
struct Given {
    reads: Reads,
    last: bool,
}

fn evaluate(
    callback: &Callback,
    route: &Route,
    engine: &ScriptEngine,
    vars: &mut Option<Result<Vars, RunError>>,
    given: Given,
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
    let vars = match vars.get_or_insert_with(|| scope_vars(callback, given.reads)) {
        Ok(v) => v,
        Err(e) => return (None, Verdict::Failed(e.clone())),
    };
    // The last script to read `body` has it without a copy: the filter, when the transform
    // does not read it; else the transform.
    let transform_reads = route.transform.as_ref().is_some_and(|t| t.reads.body);
    let mut filter_result = None;
    if let Some(filter) = &route.filter {
        match engine.filter(&route.name, filter, vars, given.last && !transform_reads) {
            Ok(true) => filter_result = Some(true),
            Ok(false) => return (Some(false), Verdict::FilteredOut),
            Err(e) => return (None, Verdict::Failed(e)),
        }
    }
    let verdict = match &route.transform {
        None => Verdict::Deliver(Payload::Original),
        Some(transform) => match engine.transform(&route.name, transform, vars, given.last) {
            Ok(TransformOutput::Body(bytes)) => {
                Verdict::Deliver(Payload::Transformed(bytes.into()))
            }
            Ok(TransformOutput::Skip) => Verdict::Dropped,
            Err(e) => Verdict::Failed(e),
        },
    };
    (filter_result, verdict)
}

/// The values scripts read, built for the scripts that may run: what none of them reads is in
/// scope as `()` (`body`) or an empty map (`query`, `headers`).
fn scope_vars(callback: &Callback, reads: Reads) -> Result<Vars, RunError> {
    let body = if reads.body {
        script::json_to_dynamic(&callback.body).map_err(|e| RunError {
            stage: Stage::Filter,
            message: format!("the body cannot be given to scripts: {e}"),
            location: None,
        })?
    } else {
        Dynamic::UNIT
    };
    let to_map = |read: bool, pairs: &[(String, String)]| -> Map {
        let mut map = Map::new();
        if !read {
            return map;
        }
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
            query: to_map(reads.query, &callback.query),
            headers: to_map(reads.headers, &callback.headers),
            event_id: (&*callback.event_id).into(),
            received_at: callback.received_at as i64,
        },
    ))
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;
    use crate::dialect;
    use crate::rules::{self, RuleSet};
    use crate::script::Limits;

    const SOURCE: &str = r#"
sources:
  app:
    path: /hooks/app
    dialect: generic
    command: body.type
targets:
  a: { url: "http://127.0.0.1:9/a" }
  b: { url: "http://127.0.0.1:9/b" }
  c: { url: "http://127.0.0.1:9/c" }
"#;

    fn load(routes: &str) -> (RuleSet, ScriptEngine) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yaml"), format!("{SOURCE}{routes}")).unwrap();
        let engine = ScriptEngine::new(dir.path(), &Limits::default());
        let rules = rules::load(dir.path(), &engine).unwrap();
        (rules, engine)
    }

    fn callback(rules: &RuleSet, body: &str) -> Callback {
        let source = rules.source("app").unwrap().clone();
        let headers = HeaderMap::new();
        let request = dialect::Request::new("", "", &headers);
        dialect::parse(
            &source,
            request,
            Bytes::copy_from_slice(body.as_bytes()),
            "ev-1".into(),
            1,
        )
        .unwrap()
    }

    fn json_bodies(routing: &Routing<'_>, callback: &Callback) -> Vec<(String, serde_json::Value)> {
        routing
            .deliveries(callback)
            .iter()
            .map(|d| {
                (
                    d.route.to_string(),
                    serde_json::from_slice(&d.body).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn each_script_sees_the_body_as_received_whichever_has_the_callbacks_own() {
        let (rules, engine) = load(
            r#"
routes:
  - name: changer
    transform: 'body.seen = true; body.items.push(#{v: "added"}); body'
    to: [a]
  - name: reader
    filter: 'body.seen == () && body.items.len() == 1'
    transform: '#{first: body.items[0].v, seen: body.seen, n: body.items.len()}'
    to: [b]
  - name: untouched
    to: [c]
  - name: last-filter-reads
    filter: 'body.items.len() == 1'
    transform: '#{command: command}'
    to: [c]
"#,
        );
        let cb = callback(&rules, r#"{"type":"t","items":[{"v":"one"}]}"#);
        let routing = route(&cb, &rules, &engine);
        assert!(routing.errors().next().is_none(), "{:?}", routing.results);
        assert_eq!(
            json_bodies(&routing, &cb),
            vec![
                (
                    "changer".to_string(),
                    serde_json::json!({"type": "t", "items": [{"v": "one"}, {"v": "added"}], "seen": true})
                ),
                (
                    "reader".to_string(),
                    serde_json::json!({"first": "one", "seen": null, "n": 1})
                ),
                (
                    "untouched".to_string(),
                    serde_json::json!({"type": "t", "items": [{"v": "one"}]})
                ),
                (
                    "last-filter-reads".to_string(),
                    serde_json::json!({"command": "t"})
                ),
            ]
        );
    }

    #[test]
    fn the_last_reader_of_body_is_the_last_selected_route_whose_scripts_read_it() {
        let routes = r#"
routes:
  - name: first
    filter: 'body.items.len() > 0'
    to: [a]
  - name: second
    filter: 'command == "t"'
    transform: 'body'
    to: [b]
  - name: no-body
    filter: 'command == "t"'
    to: [c]
  - name: other-command
    commands: ["other"]
    filter: 'body.x == 1'
    to: [c]
"#;
        let (rules, _) = load(routes);
        let cb = callback(&rules, r#"{"type":"t","items":[1]}"#);
        assert_eq!(last_body_reader(&cb, &rules.routes), Some(1));

        // A response_transform that reads `body` runs after every route: nothing is given away.
        let (rules, _) = load(&format!(
            r#"{routes}
  - name: answer
    respond: true
    response_transform: '#{{ok: body.type}}'
    to: [a]
"#
        ));
        let cb = callback(&rules, r#"{"type":"t","items":[1]}"#);
        assert_eq!(last_body_reader(&cb, &rules.routes), None);
    }

    #[test]
    fn the_rule_set_reads_what_its_scripts_name() {
        let (rules, _) = load(
            r#"
routes:
  - name: by-header
    filter: 'headers["x-kind"] == "a"'
    to: [a]
"#,
        );
        assert_eq!(
            rules.reads,
            Reads {
                body: false,
                query: false,
                headers: true
            }
        );
        let (rules, _) = load("routes:\n  - name: plain\n    to: [a]\n");
        assert_eq!(rules.reads, Reads::NONE);
    }
}
