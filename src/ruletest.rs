//! `switchyard test`: rule files that test themselves.
//!
//! Each case in `DIR/tests/*.yaml` gives a request as the IM server sends it and what must come
//! of it. A case goes through the same authorization, dialect parse, router, request preparation
//! and answer relay as `serve`; nothing is sent and no server runs. A synchronous route's target
//! answer is mocked by the case (`respond_with`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value as Json;

use crate::delivery::{client, now_ms};
use crate::dialect::{self, DialectKind, Rejection};
use crate::respond::{self, Failure, Reply};
use crate::router::{self, Verdict};
use crate::rules::yaml::{self, Node, Pos, Value};
use crate::rules::RuleSet;
use crate::script::ScriptEngine;

/// The `event_id` every case's callback gets, so transforms that copy it can be expected exactly.
pub const EVENT_ID: &str = "00000000-0000-7000-8000-000000000000";

/// One test case, read from a test file.
#[derive(Debug)]
pub struct Case {
    pub name: String,
    /// `FILE:LINE` of the case.
    pub at: String,
    source: String,
    request: RequestSpec,
    respond_with: Option<Mock>,
    expect: Expect,
}

#[derive(Debug, Default)]
struct RequestSpec {
    query: Vec<(String, String)>,
    path_suffix: String,
    headers: Vec<(String, String)>,
    body: Bytes,
    sign: bool,
}

/// The mocked answer of a synchronous route's target.
#[derive(Debug)]
enum Mock {
    Answer { status: u16, body: Bytes },
    Timeout,
    Unreachable,
}

#[derive(Debug, Default)]
struct Expect {
    routes: Option<Vec<String>>,
    deliveries: Option<Vec<ExpectedDelivery>>,
    nothing_delivered: bool,
    answer: Option<BodyCheck>,
    rejected: Option<ExpectedRejection>,
    dead_letters: Option<Vec<String>>,
}

#[derive(Debug)]
struct ExpectedDelivery {
    target: String,
    route: Option<String>,
    url: Option<String>,
    headers: Vec<(String, String)>,
    body: Option<BodyCheck>,
}

#[derive(Debug)]
enum BodyCheck {
    /// The JSON must be equal (key order aside).
    Exact(Json),
    /// Every field given must be there with this value; others may be too.
    Includes(Json),
    /// The bytes must be these.
    Bytes(Bytes),
}

#[derive(Debug, Default)]
struct ExpectedRejection {
    status: Option<u16>,
    reason_includes: Option<String>,
}

/// What came of a case's request.
struct Actual {
    rejected: Option<Rejection>,
    fired: Vec<String>,
    dead_letters: Vec<String>,
    deliveries: Vec<SentRequest>,
    /// The answer body, and a note when it could not be computed.
    answer: Result<Bytes, String>,
    /// The synchronous route answering, if any.
    responder: Option<String>,
}

struct SentRequest {
    route: String,
    target: String,
    url: String,
    headers: HeaderMap,
    body: Bytes,
}

/// The totals of a run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
}

/// The cases of a rules directory, and what could not be read.
#[derive(Debug, Default)]
pub struct Loaded {
    pub cases: Vec<Case>,
    /// `FILE:LINE:COL: message`, one per problem.
    pub errors: Vec<String>,
    /// Cases (or whole files) that cannot run because of those errors.
    pub broken: usize,
}

/// Reads every case of `DIR/tests/*.yaml` (and `*.yml`), by file name.
pub fn load_cases(dir: &Path) -> Loaded {
    let tests_dir = dir.join("tests");
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&tests_dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
                !name.starts_with('.')
                    && (name.ends_with(".yaml") || name.ends_with(".yml"))
                    && p.is_file()
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    let mut loaded = Loaded::default();
    let mut names = std::collections::HashMap::<String, String>::new();
    for file in files {
        let mut reader = Reader {
            file: &file,
            errors: Vec::new(),
            broken: 0,
        };
        for case in reader.file_cases() {
            if let Some(first) = names.insert(case.name.clone(), case.at.clone()) {
                reader.errors.push(format!(
                    "{}: a case named `{}` is already at {first}; names must be unique",
                    case.at, case.name
                ));
                reader.broken += 1;
                continue;
            }
            loaded.cases.push(case);
        }
        loaded.errors.extend(reader.errors);
        loaded.broken += reader.broken;
    }
    loaded
}

/// Runs the cases whose name contains `filter` and writes one line per case (and a diff for each
/// failure) to `out`.
pub fn run(
    rules: &RuleSet,
    engine: &ScriptEngine,
    cases: &[Case],
    filter: Option<&str>,
    out: &mut impl std::io::Write,
) -> std::io::Result<Summary> {
    let mut summary = Summary::default();
    for case in cases {
        if filter.is_some_and(|f| !case.name.contains(f)) {
            continue;
        }
        let problems = check(rules, engine, case);
        if problems.is_empty() {
            summary.passed += 1;
            writeln!(out, "test {} ... ok", case.name)?;
        } else {
            summary.failed += 1;
            writeln!(out, "test {} ... FAILED ({})", case.name, case.at)?;
            for problem in problems {
                for line in problem.lines() {
                    writeln!(out, "    {line}")?;
                }
            }
        }
    }
    Ok(summary)
}

/// What is wrong with the case's outcome; empty when it passes.
fn check(rules: &RuleSet, engine: &ScriptEngine, case: &Case) -> Vec<String> {
    let actual = match perform(rules, engine, case) {
        Ok(a) => a,
        Err(problem) => return vec![problem],
    };
    let mut problems = Vec::new();
    let expect = &case.expect;
    match (&expect.rejected, &actual.rejected) {
        (Some(want), Some(got)) => {
            if want.status.is_some_and(|s| s != got.status.as_u16()) {
                problems.push(format!(
                    "rejected with {}, expected {}: {}",
                    got.status.as_u16(),
                    want.status.unwrap_or_default(),
                    got.reason
                ));
            }
            if let Some(needle) = &want.reason_includes {
                if !got.reason.contains(needle.as_str()) {
                    problems.push(format!(
                        "the reason {:?} does not include {needle:?}",
                        got.reason
                    ));
                }
            }
        }
        (Some(_), None) => problems.push("expected a rejection; the callback was accepted".into()),
        (None, Some(got)) => problems.push(format!(
            "the callback was rejected with {}: {}",
            got.status.as_u16(),
            got.reason
        )),
        (None, None) => {}
    }
    if let Some(want) = &expect.routes {
        check_names("routes fired", want, &actual.fired, &mut problems);
    }
    if let Some(want) = &expect.dead_letters {
        check_names(
            "dead letters (routes whose script failed)",
            want,
            &actual.dead_letters,
            &mut problems,
        );
    } else if !actual.dead_letters.is_empty() && actual.rejected.is_none() {
        let details = actual.dead_letters.join(", ");
        problems.push(format!(
            "a script failed on route(s) {details}; add `dead_letters: [{details}]` if that is expected"
        ));
    }
    if expect.nothing_delivered && !actual.deliveries.is_empty() {
        let list: Vec<String> = actual.deliveries.iter().map(describe).collect();
        problems.push(format!(
            "expected nothing delivered; delivered:\n  {}",
            list.join("\n  ")
        ));
    }
    if let Some(want) = &expect.deliveries {
        check_deliveries(want, &actual.deliveries, &mut problems);
    }
    if let Some(want) = &expect.answer {
        match &actual.answer {
            Ok(body) => {
                let what = match &actual.responder {
                    Some(route) => format!("the answer (from route {route})"),
                    None => "the answer".to_string(),
                };
                check_body(&what, want, body, &mut problems);
            }
            Err(why) => problems.push(why.clone()),
        }
    }
    if case.respond_with.is_some() && actual.responder.is_none() && actual.rejected.is_none() {
        problems.push(
            "`respond_with` is given, but no synchronous (`respond: true`) route answers this callback"
                .into(),
        );
    }
    problems
}

/// Sends the case's request through the rules, as `serve` would, sending nothing.
fn perform(rules: &RuleSet, engine: &ScriptEngine, case: &Case) -> Result<Actual, String> {
    let source = rules.source(&case.source).ok_or_else(|| {
        let names: Vec<&str> = rules.sources.iter().map(|s| &*s.name).collect();
        format!(
            "no source named `{}` in the rules (sources: {})",
            case.source,
            names.join(", ")
        )
    })?;
    let spec = &case.request;
    let now = now_ms();
    let mut query = spec.query.clone();
    if spec.sign && source.dialect == DialectKind::Tencent {
        if let Some(token) = source.token.as_deref().filter(|t| !t.is_empty()) {
            let time = (now / 1000).to_string();
            query.retain(|(k, _)| k != "Sign" && k != "RequestTime");
            query.push(("Sign".into(), dialect::tencent::sign(token, &time)));
            query.push(("RequestTime".into(), time));
        }
    }
    let raw_query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&query)
        .finish();
    let headers =
        dialect::request_headers(spec.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
    let request = dialect::Request::new(&raw_query, &spec.path_suffix, &headers);
    let kind = source.dialect;
    let rejected = |rejection: Rejection| Actual {
        answer: Ok(dialect::reject(kind, &rejection)),
        rejected: Some(rejection),
        fired: Vec::new(),
        dead_letters: Vec::new(),
        deliveries: Vec::new(),
        responder: None,
    };
    if let Err(rejection) = dialect::authorize(source, &request, now / 1000) {
        return Ok(rejected(rejection));
    }
    if spec.body.len() > source.max_body {
        return Ok(rejected(crate::ingress::too_large(source.max_body)));
    }
    let event_id: Arc<str> = EVENT_ID.into();
    let callback = match dialect::parse(source, request, spec.body.clone(), event_id, now) {
        Ok(c) => c,
        Err(rejection) => return Ok(rejected(rejection)),
    };
    let mut routing = router::route(&callback, rules, engine);
    let fired = routing
        .results
        .iter()
        .filter(|r| matches!(r.verdict, Verdict::Deliver(_)))
        .map(|r| r.route.name.to_string())
        .collect();
    let dead_letters = routing.errors().map(|(r, _)| r.name.to_string()).collect();
    let mut queued = routing.deliveries(&callback);
    let responder = routing.responder(&callback);
    let responder_route = responder.as_ref().map(|r| r.route.name.to_string());
    let answer = match responder {
        None => Ok(dialect::ack(kind, &callback.event_id)),
        Some(responder) => {
            let route = responder.route;
            let reply = match (&responder.delivery, &case.respond_with) {
                (Err(e), _) => Some(Err(Failure::Script(e.clone()))),
                (Ok(_), Some(Mock::Answer { status, body })) => Some(Ok(Reply {
                    status: *status,
                    body: body.clone(),
                })),
                (Ok(_), Some(Mock::Timeout)) => Some(Err(Failure::Timeout)),
                (Ok(_), Some(Mock::Unreachable)) => Some(Err(Failure::Unreachable(
                    "connection refused (respond_with: unreachable)".into(),
                ))),
                (Ok(_), None) => None,
            };
            // The synchronous ask is a request like the others, whatever it is answered.
            if let Ok(delivery) = responder.delivery {
                queued.push(delivery);
            }
            match reply {
                None => Err(format!(
                    "route {} answers this callback synchronously: give `respond_with` \
                     (the target's answer) to check the answer",
                    route.name
                )),
                Some(reply) => {
                    let vars = route
                        .response_transform
                        .is_some()
                        .then(|| routing.vars(&callback));
                    Ok(respond::relay(&callback, route, engine, vars, reply).body)
                }
            }
        }
    };
    Ok(finish(
        rules,
        fired,
        dead_letters,
        queued,
        responder_route,
        answer,
        now,
    ))
}

fn finish(
    rules: &RuleSet,
    fired: Vec<String>,
    dead_letters: Vec<String>,
    deliveries: Vec<crate::delivery::Delivery>,
    responder: Option<String>,
    answer: Result<Bytes, String>,
    now: u64,
) -> Actual {
    let deliveries = deliveries
        .iter()
        .filter_map(|d| {
            let target = rules.target(&d.target)?;
            let prepared = client::prepare(target, d, now / 1000);
            Some(SentRequest {
                route: d.route.to_string(),
                target: d.target.to_string(),
                url: prepared.url,
                headers: prepared.headers,
                body: prepared.body,
            })
        })
        .collect();
    Actual {
        rejected: None,
        fired,
        dead_letters,
        deliveries,
        answer,
        responder,
    }
}

fn describe(d: &SentRequest) -> String {
    format!(
        "to {} (route {}) {}: {}",
        d.target,
        d.route,
        d.url,
        shorten(&String::from_utf8_lossy(&d.body))
    )
}

fn shorten(text: &str) -> String {
    const MAX: usize = 400;
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

fn check_names(what: &str, want: &[String], got: &[String], problems: &mut Vec<String>) {
    let missing: Vec<&String> = want.iter().filter(|w| !got.contains(w)).collect();
    let extra: Vec<&String> = got.iter().filter(|g| !want.contains(g)).collect();
    if missing.is_empty() && extra.is_empty() {
        return;
    }
    let mut text = format!("{what}: expected {want:?}, actual {got:?}");
    if !missing.is_empty() {
        let _ = write!(text, "\n  missing: {missing:?}");
    }
    if !extra.is_empty() {
        let _ = write!(text, "\n  not expected: {extra:?}");
    }
    problems.push(text);
}

fn check_deliveries(want: &[ExpectedDelivery], got: &[SentRequest], problems: &mut Vec<String>) {
    let mut used = vec![false; got.len()];
    for expected in want {
        let what = match &expected.route {
            Some(route) => format!("the delivery to {} (route {route})", expected.target),
            None => format!("the delivery to {}", expected.target),
        };
        let candidates: Vec<usize> = (0..got.len())
            .filter(|&i| {
                !used[i]
                    && got[i].target == expected.target
                    && expected.route.as_ref().is_none_or(|r| *r == got[i].route)
            })
            .collect();
        if candidates.is_empty() {
            let list: Vec<String> = got.iter().map(describe).collect();
            problems.push(format!(
                "{what}: none was made; the deliveries were:\n  {}",
                if list.is_empty() {
                    "(none)".to_string()
                } else {
                    list.join("\n  ")
                }
            ));
            continue;
        }
        // The first candidate that satisfies everything; else report against the first.
        let verdicts: Vec<Vec<String>> = candidates
            .iter()
            .map(|&i| delivery_problems(&what, expected, &got[i]))
            .collect();
        let pick = verdicts.iter().position(|v| v.is_empty()).unwrap_or(0);
        used[candidates[pick]] = true;
        problems.extend(verdicts.into_iter().nth(pick).unwrap_or_default());
    }
    for (i, d) in got.iter().enumerate() {
        if !used[i] {
            problems.push(format!("a delivery was not expected: {}", describe(d)));
        }
    }
}

fn delivery_problems(what: &str, expected: &ExpectedDelivery, got: &SentRequest) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(url) = &expected.url {
        if *url != got.url {
            problems.push(format!("{what}: url {:?}, expected {url:?}", got.url));
        }
    }
    for (name, value) in &expected.headers {
        let actual = got
            .headers
            .get(name.to_ascii_lowercase().as_str())
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        if actual.as_deref() != Some(value.as_str()) {
            problems.push(format!(
                "{what}: header {name} is {}, expected {value:?}",
                actual.map_or("missing".to_string(), |a| format!("{a:?}"))
            ));
        }
    }
    if let Some(body) = &expected.body {
        check_body(&format!("{what}: body"), body, &got.body, &mut problems);
    }
    problems
}

fn check_body(what: &str, want: &BodyCheck, body: &Bytes, problems: &mut Vec<String>) {
    let text = String::from_utf8_lossy(body);
    match want {
        BodyCheck::Bytes(bytes) => {
            if bytes != body {
                problems.push(format!(
                    "{what} differs from the expected bytes\n  expected: {}\n  actual:   {}",
                    shorten(&String::from_utf8_lossy(bytes)),
                    shorten(&text)
                ));
            }
        }
        BodyCheck::Exact(json) | BodyCheck::Includes(json) => {
            let subset = matches!(want, BodyCheck::Includes(_));
            let Ok(actual) = serde_json::from_slice::<Json>(body) else {
                problems.push(format!("{what} is not JSON: {}", shorten(&text)));
                return;
            };
            let mut diffs = Vec::new();
            diff(json, &actual, "", subset, &mut diffs);
            if !diffs.is_empty() {
                let shown = diffs.len().min(20);
                let mut report = format!(
                    "{what} {}:",
                    if subset {
                        "lacks expected fields"
                    } else {
                        "differs"
                    }
                );
                for d in &diffs[..shown] {
                    let _ = write!(report, "\n  {d}");
                }
                if diffs.len() > shown {
                    let _ = write!(report, "\n  … and {} more", diffs.len() - shown);
                }
                let _ = write!(report, "\n  actual: {}", shorten(&text));
                problems.push(report);
            }
        }
    }
}

/// The differences between an expected and an actual JSON value, one line per place, as
/// `PATH: expected X, actual Y`. With `subset`, fields the expectation leaves out are ignored.
fn diff(want: &Json, got: &Json, path: &str, subset: bool, out: &mut Vec<String>) {
    let here = if path.is_empty() { "." } else { path };
    match (want, got) {
        (Json::Object(w), Json::Object(g)) => {
            for (key, wv) in w {
                let p = format!("{path}.{key}");
                match g.get(key) {
                    Some(gv) => diff(wv, gv, &p, subset, out),
                    None => out.push(format!("{p}: expected {wv}, missing")),
                }
            }
            if !subset {
                for (key, gv) in g {
                    if !w.contains_key(key) {
                        out.push(format!("{path}.{key}: not expected, actual {gv}"));
                    }
                }
            }
        }
        (Json::Array(w), Json::Array(g)) => {
            if w.len() != g.len() {
                out.push(format!(
                    "{here}: expected {} items, actual {} ({got})",
                    w.len(),
                    g.len()
                ));
                return;
            }
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                diff(wv, gv, &format!("{path}[{i}]"), subset, out);
            }
        }
        (Json::Number(w), Json::Number(g)) if w.as_f64() == g.as_f64() => {}
        _ if want == got => {}
        _ => out.push(format!("{here}: expected {want}, actual {got}")),
    }
}

/// Reads one test file into cases, collecting errors as `FILE:LINE:COL: message`.
struct Reader<'a> {
    file: &'a Path,
    errors: Vec<String>,
    /// Cases that cannot run (a file that cannot be read at all counts as one).
    broken: usize,
}

impl Reader<'_> {
    fn error(&mut self, pos: Pos, message: impl std::fmt::Display) {
        self.errors.push(format!(
            "{}:{}:{}: {message}",
            self.file.display(),
            pos.line,
            pos.col
        ));
    }

    fn file_cases(&mut self) -> Vec<Case> {
        let before = self.errors.len();
        let cases = self.read_file();
        if self.errors.len() > before && self.broken == 0 {
            self.broken = 1;
        }
        cases
    }

    fn read_file(&mut self) -> Vec<Case> {
        let text = match std::fs::read_to_string(self.file) {
            Ok(t) => t,
            Err(e) => {
                self.errors
                    .push(format!("{}: cannot read: {e}", self.file.display()));
                return Vec::new();
            }
        };
        let root = match yaml::parse(&text) {
            Ok(n) => n,
            Err(e) => {
                self.error(e.pos, e.message);
                return Vec::new();
            }
        };
        let Some(mut fields) = self.fields(&root, "a test file", &["tests"]) else {
            return Vec::new();
        };
        let Some(list) = fields.remove("tests") else {
            self.error(root.pos, "a test file needs `tests:`, a list of cases");
            return Vec::new();
        };
        let Value::Seq(items) = &list.value else {
            self.error(list.pos, "`tests` must be a list of cases");
            return Vec::new();
        };
        items.iter().filter_map(|item| self.case(item)).collect()
    }

    /// The entries of a mapping, refusing keys not in `known`.
    fn fields<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        known: &[&str],
    ) -> Option<std::collections::HashMap<String, &'n Node>> {
        let Value::Map(entries) = &node.value else {
            self.error(
                node.pos,
                format!("{what} must be a mapping, found {}", node.value.kind()),
            );
            return None;
        };
        let mut out = std::collections::HashMap::new();
        for (key, value) in entries {
            if known.contains(&key.name.as_str()) {
                out.insert(key.name.clone(), value);
            } else {
                self.error(
                    key.pos,
                    format!(
                        "unknown key `{}` in {what} (expected one of: {})",
                        key.name,
                        known.join(", ")
                    ),
                );
            }
        }
        Some(out)
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        node.scalar_text(what)
            .map_err(|message| self.error(node.pos, message))
            .ok()
    }

    fn bool(&mut self, node: &Node, what: &str) -> bool {
        match node.value {
            Value::Bool(b) => b,
            ref other => {
                self.error(
                    node.pos,
                    format!("{what} must be true or false, found {}", other.kind()),
                );
                false
            }
        }
    }

    fn names(&mut self, node: &Node, what: &str) -> Option<Vec<String>> {
        let Value::Seq(items) = &node.value else {
            self.error(node.pos, format!("{what} must be a list of names"));
            return None;
        };
        items.iter().map(|i| self.string(i, what)).collect()
    }

    fn pairs(&mut self, node: &Node, what: &str) -> Vec<(String, String)> {
        let Value::Map(entries) = &node.value else {
            self.error(
                node.pos,
                format!("{what} must be a mapping of names to values"),
            );
            return Vec::new();
        };
        entries
            .iter()
            .filter_map(|(k, v)| Some((k.name.clone(), self.string(v, what)?)))
            .collect()
    }

    /// A file path relative to the test file.
    fn file_bytes(&mut self, node: &Node, what: &str) -> Option<Bytes> {
        let name = self.string(node, what)?;
        let path = self.file.parent().unwrap_or(Path::new(".")).join(&name);
        match std::fs::read(&path) {
            Ok(bytes) => Some(bytes.into()),
            Err(e) => {
                self.error(
                    node.pos,
                    format!("cannot read {what} {} : {e}", path.display()),
                );
                None
            }
        }
    }

    /// A body given as a YAML value (sent as its JSON) or, for a string, as that text.
    fn body_value(node: &Node) -> Bytes {
        match &node.value {
            Value::Str(s) => Bytes::from(s.clone()),
            _ => serde_json::to_vec(&to_json(node))
                .expect("JSON from YAML values")
                .into(),
        }
    }

    fn case(&mut self, node: &Node) -> Option<Case> {
        let before = self.errors.len();
        let mut f = self.fields(
            node,
            "a test case",
            &["name", "source", "request", "respond_with", "expect"],
        )?;
        let at = format!("{}:{}", self.file.display(), node.pos.line);
        let name = match f.remove("name") {
            Some(n) => self.string(n, "`name`"),
            None => {
                self.error(node.pos, "a test case needs a `name`");
                None
            }
        };
        let source = match f.remove("source") {
            Some(n) => self.string(n, "`source`"),
            None => {
                self.error(node.pos, "a test case needs a `source` (a source's name)");
                None
            }
        };
        let request = match f.remove("request") {
            Some(n) => self.request(n),
            None => {
                self.error(
                    node.pos,
                    "a test case needs a `request` (at least a `body`)",
                );
                None
            }
        };
        let respond_with = f.remove("respond_with").and_then(|n| self.mock(n));
        let expect = match f.remove("expect") {
            Some(n) => self.expect(n),
            None => {
                self.error(node.pos, "a test case needs `expect`");
                None
            }
        };
        if self.errors.len() > before {
            self.broken += 1;
            return None;
        }
        Some(Case {
            name: name?,
            at,
            source: source?,
            request: request?,
            respond_with,
            expect: expect?,
        })
    }

    fn request(&mut self, node: &Node) -> Option<RequestSpec> {
        let f = self.fields(
            node,
            "`request`",
            &[
                "query",
                "path_suffix",
                "headers",
                "body",
                "body_file",
                "sign",
            ],
        )?;
        let mut spec = RequestSpec::default();
        if let Some(q) = f.get("query") {
            spec.query = match &q.value {
                Value::Str(s) => form_urlencoded::parse(s.trim_start_matches('?').as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect(),
                _ => self.pairs(q, "`query`"),
            };
        }
        if let Some(p) = f.get("path_suffix") {
            spec.path_suffix = self.string(p, "`path_suffix`").unwrap_or_default();
        }
        if let Some(h) = f.get("headers") {
            spec.headers = self.pairs(h, "`headers`");
        }
        if let Some(s) = f.get("sign") {
            spec.sign = self.bool(s, "`sign`");
        }
        spec.body = match (f.get("body"), f.get("body_file")) {
            (Some(_), Some(file)) => {
                self.error(file.pos, "give `body` or `body_file`, not both");
                return None;
            }
            (Some(body), None) => Self::body_value(body),
            (None, Some(file)) => self.file_bytes(file, "`body_file`")?,
            (None, None) => {
                self.error(node.pos, "`request` needs a `body` or a `body_file`");
                return None;
            }
        };
        Some(spec)
    }

    fn mock(&mut self, node: &Node) -> Option<Mock> {
        let f = self.fields(
            node,
            "`respond_with`",
            &["status", "body", "timeout", "unreachable"],
        )?;
        if f.get("timeout").is_some_and(|n| self.bool(n, "`timeout`")) {
            return Some(Mock::Timeout);
        }
        if f.get("unreachable")
            .is_some_and(|n| self.bool(n, "`unreachable`"))
        {
            return Some(Mock::Unreachable);
        }
        let status = match f.get("status") {
            None => 200,
            Some(n) => match n.value {
                Value::Int(s @ 100..=599) => s as u16,
                _ => {
                    self.error(n.pos, "`status` must be an HTTP status, 100 to 599");
                    return None;
                }
            },
        };
        let Some(body) = f.get("body") else {
            self.error(
                node.pos,
                "`respond_with` needs a `body` (or `timeout: true`, `unreachable: true`)",
            );
            return None;
        };
        Some(Mock::Answer {
            status,
            body: Self::body_value(body),
        })
    }

    fn expect(&mut self, node: &Node) -> Option<Expect> {
        let f = self.fields(
            node,
            "`expect`",
            &[
                "routes",
                "deliveries",
                "nothing_delivered",
                "answer",
                "answer_includes",
                "rejected",
                "dead_letters",
            ],
        )?;
        let mut expect = Expect::default();
        if let Some(n) = f.get("routes") {
            expect.routes = self.names(n, "`routes`");
        }
        if let Some(n) = f.get("dead_letters") {
            expect.dead_letters = self.names(n, "`dead_letters`");
        }
        if let Some(n) = f.get("nothing_delivered") {
            expect.nothing_delivered = self.bool(n, "`nothing_delivered`");
        }
        if let Some(n) = f.get("deliveries") {
            match &n.value {
                Value::Seq(items) => {
                    expect.deliveries = items.iter().map(|i| self.delivery(i)).collect();
                }
                _ => self.error(n.pos, "`deliveries` must be a list"),
            }
        }
        expect.answer = match (f.get("answer"), f.get("answer_includes")) {
            (Some(_), Some(n)) => {
                self.error(n.pos, "give `answer` or `answer_includes`, not both");
                None
            }
            (Some(n), None) => Some(BodyCheck::Exact(to_json(n))),
            (None, Some(n)) => Some(BodyCheck::Includes(to_json(n))),
            (None, None) => None,
        };
        if let Some(n) = f.get("rejected") {
            let r = self.fields(n, "`rejected`", &["status", "reason_includes"])?;
            let mut rejection = ExpectedRejection::default();
            if let Some(s) = r.get("status") {
                match s.value {
                    Value::Int(v @ 400..=599) => rejection.status = Some(v as u16),
                    _ => self.error(s.pos, "`status` must be an HTTP error status, 400 to 599"),
                }
            }
            if let Some(s) = r.get("reason_includes") {
                rejection.reason_includes = self.string(s, "`reason_includes`");
            }
            expect.rejected = Some(rejection);
        }
        let checks = expect.routes.is_some()
            || expect.deliveries.is_some()
            || expect.nothing_delivered
            || expect.answer.is_some()
            || expect.rejected.is_some()
            || expect.dead_letters.is_some();
        if !checks {
            self.error(
                node.pos,
                "`expect` checks nothing: give `routes`, `deliveries`, `nothing_delivered`, \
                 `answer`, `answer_includes`, `rejected` or `dead_letters`",
            );
        }
        if expect.nothing_delivered && expect.deliveries.as_ref().is_some_and(|d| !d.is_empty()) {
            self.error(
                node.pos,
                "`nothing_delivered: true` contradicts the `deliveries` listed",
            );
        }
        Some(expect)
    }

    fn delivery(&mut self, node: &Node) -> Option<ExpectedDelivery> {
        let f = self.fields(
            node,
            "an expected delivery",
            &[
                "target",
                "route",
                "url",
                "headers",
                "body",
                "body_includes",
                "body_file",
            ],
        )?;
        let Some(target) = f.get("target").and_then(|n| self.string(n, "`target`")) else {
            self.error(node.pos, "an expected delivery needs a `target`");
            return None;
        };
        let route = f.get("route").and_then(|n| self.string(n, "`route`"));
        let url = f.get("url").and_then(|n| self.string(n, "`url`"));
        let headers = f
            .get("headers")
            .map(|n| self.pairs(n, "`headers`"))
            .unwrap_or_default();
        let given: Vec<&str> = ["body", "body_includes", "body_file"]
            .into_iter()
            .filter(|k| f.contains_key(*k))
            .collect();
        if given.len() > 1 {
            self.error(
                node.pos,
                format!("give one of `body`, `body_includes`, `body_file`, not {given:?}"),
            );
            return None;
        }
        let body = if let Some(n) = f.get("body") {
            Some(BodyCheck::Exact(to_json(n)))
        } else if let Some(n) = f.get("body_includes") {
            Some(BodyCheck::Includes(to_json(n)))
        } else if let Some(n) = f.get("body_file") {
            Some(BodyCheck::Bytes(self.file_bytes(n, "`body_file`")?))
        } else {
            None
        };
        Some(ExpectedDelivery {
            target,
            route,
            url,
            headers,
            body,
        })
    }
}

/// A YAML value as JSON.
fn to_json(node: &Node) -> Json {
    match &node.value {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Str(s) => Json::String(s.clone()),
        Value::Seq(items) => Json::Array(items.iter().map(to_json).collect()),
        Value::Map(entries) => Json::Object(
            entries
                .iter()
                .map(|(k, v)| (k.name.clone(), to_json(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn diffs(want: Json, got: Json, subset: bool) -> Vec<String> {
        let mut out = Vec::new();
        diff(&want, &got, "", subset, &mut out);
        out
    }

    #[test]
    fn exact_bodies_report_every_difference_with_its_path() {
        let got = json!({"a": 1, "b": {"c": [1, 2]}, "extra": true});
        assert_eq!(
            diffs(json!({"a": 2, "b": {"c": [1, 3]}, "d": null}), got, false),
            [
                ".a: expected 2, actual 1",
                ".b.c[1]: expected 3, actual 2",
                ".d: expected null, missing",
                ".extra: not expected, actual true",
            ]
        );
        assert!(diffs(json!({"x": 1.0}), json!({"x": 1}), false).is_empty());
        assert_eq!(
            diffs(json!([1]), json!([1, 2]), false),
            [".: expected 1 items, actual 2 ([1,2])"]
        );
    }

    #[test]
    fn includes_ignores_fields_left_out_even_inside_arrays() {
        let got = json!({"a": 1, "list": [{"k": 1, "v": 2}], "z": "x"});
        assert!(diffs(json!({"list": [{"k": 1}]}), got.clone(), true).is_empty());
        assert_eq!(
            diffs(json!({"list": [{"k": 2}]}), got, true),
            [".list[0].k: expected 2, actual 1"]
        );
    }
}
