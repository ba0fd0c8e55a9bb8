//! The one Rhai engine: its limits, its helpers, and JSON ⇄ Rhai conversion.
//!
//! The engine is built once per process and never changed afterwards (a frozen engine is `Sync`
//! and shared by every request). Rule loads compile scripts through it; the router runs them.
//! Limits are always on, so a hostile or buggy script costs at most a bounded amount of work and
//! fails like any other runtime error. This module never touches the network.

use std::cell::RefCell;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use rhai::module_resolvers::FileModuleResolver;
use rhai::{
    Dynamic, Engine, EvalAltResult, ImmutableString, Map, Module, ModuleResolver, Position, Scope,
    Shared, AST,
};

/// Limits applied to every script run.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_operations: u64,
    pub max_call_levels: usize,
    pub max_expr_depth: usize,
    pub max_string_size: usize,
    pub max_array_size: usize,
    pub max_map_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: 100_000,
            max_call_levels: 32,
            max_expr_depth: 64,
            max_string_size: 1 << 20,
            max_array_size: 10_000,
            max_map_size: 10_000,
        }
    }
}

/// Which part of a route a script plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    Filter,
    Transform,
    /// A synchronous route's `response_transform`: the target's answer → the IM server's.
    Response,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Filter => "filter",
            Stage::Transform => "transform",
            Stage::Response => "response_transform",
        }
    }

    /// The names a script of this stage may read beyond [`SCOPE_NAMES`].
    fn extra_names(self) -> &'static [&'static str] {
        match self {
            Stage::Filter | Stage::Transform => &[],
            Stage::Response => &RESPONSE_NAMES,
        }
    }
}

/// Where a script's text came from, to turn Rhai positions into `FILE:LINE:COL`.
#[derive(Clone, Debug)]
pub struct ScriptOrigin {
    /// File the position is reported in (the rule file for inline scripts, else the script file).
    pub file: Arc<str>,
    /// Line of the script's first line in `file`, 1-based.
    pub first_line: u32,
    /// Column of the script's first character on its first line, 1-based.
    pub first_col: u32,
}

impl ScriptOrigin {
    /// `FILE:LINE` of the script's first line: where an error about its result points.
    pub fn start(&self) -> String {
        format!("{}:{}", self.file, self.first_line)
    }

    /// Position in the file of a position in the script.
    pub fn locate(&self, pos: Position) -> (u32, u32) {
        let line = pos.line().unwrap_or(1) as u32;
        let col = pos.position().unwrap_or(1) as u32;
        if line <= 1 {
            (self.first_line, self.first_col + col - 1)
        } else {
            (self.first_line + line - 1, col)
        }
    }
}

/// A compiled script, ready to run many times.
#[derive(Clone)]
pub struct Script {
    ast: Arc<AST>,
    pub origin: ScriptOrigin,
    /// Which of the callback's costly values the script reads.
    pub reads: Reads,
}

/// Which of the values that cost work per callback — `body` (the JSON turned into Rhai values),
/// `query` and `headers` (maps built from the request) — a script reads. Each is built only when
/// a script of the rule set reads it; the others are in scope as `()` or an empty map, which no
/// script can tell (reading a variable means naming it, and these scripts do not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reads {
    pub body: bool,
    pub query: bool,
    pub headers: bool,
}

impl Reads {
    pub const NONE: Reads = Reads {
        body: false,
        query: false,
        headers: false,
    };
}

impl std::ops::BitOr for Reads {
    type Output = Reads;
    fn bitor(self, other: Reads) -> Reads {
        Reads {
            body: self.body || other.body,
            query: self.query || other.query,
            headers: self.headers || other.headers,
        }
    }
}

/// How a script gets `body`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    /// A copy: a later script of the callback reads `body` too, and must see it as received.
    Copy,
    /// The callback's own: no later script reads it (the router knows).
    Take,
    /// `()`: the script does not read it.
    Unread,
}

impl Body {
    /// How `script` gets `body`, `last` when no script after it reads it.
    fn for_script(script: &Script, last: bool) -> Body {
        match (script.reads.body, last) {
            (false, _) => Body::Unread,
            (true, true) => Body::Take,
            (true, false) => Body::Copy,
        }
    }
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Script({}:{})", self.origin.file, self.origin.first_line)
    }
}

/// A compile error, already located in its file.
#[derive(Debug, Clone)]
pub struct CompileError {
    pub file: Arc<str>,
    pub line: u32,
    pub col: u32,
    pub message: String,
}

/// A runtime failure of one script run (an error or a limit hit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunError {
    pub stage: Stage,
    pub message: String,
    /// `FILE:LINE` of the failure when Rhai knows it.
    pub location: Option<String>,
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.location {
            Some(loc) => write!(
                f,
                "{} failed at {}: {}",
                self.stage.as_str(),
                loc,
                self.message
            ),
            None => write!(f, "{} failed: {}", self.stage.as_str(), self.message),
        }
    }
}

/// What a transform produced.
#[derive(Debug)]
pub enum TransformOutput {
    /// JSON bytes to send.
    Body(Vec<u8>),
    /// The script returned `()`: nothing is delivered on this route.
    Skip,
}

/// Names every filter and transform can read. Compiling with these declared lets the engine
/// reject a misspelt variable at load time instead of at the first callback.
pub const SCOPE_NAMES: [&str; 9] = [
    "body",
    "command",
    "source",
    "dialect",
    "app_id",
    "query",
    "headers",
    "event_id",
    "received_at",
];

/// What a `response_transform` reads besides the callback's names: the target's JSON answer
/// and its HTTP status.
pub const RESPONSE_NAMES: [&str; 2] = ["response", "status"];

/// The scope scripts see for one callback: `body`, and the callback's constants.
#[derive(Debug)]
pub struct Vars {
    /// The constants as a scope, shared by every script run on the callback, and `body` as
    /// received. Scripts cannot change constants, and what a script declares is removed after it,
    /// so each script still sees the callback as it came; `body`, which scripts may change, is
    /// copied for each but the last to read it (see [`Body`]).
    scope: Mutex<(Scope<'static>, Option<Dynamic>)>,
}

/// The callback's values scripts read besides `body` (SPEC's scope table).
pub struct Constants {
    pub command: ImmutableString,
    pub source: ImmutableString,
    pub dialect: ImmutableString,
    pub app_id: ImmutableString,
    pub query: Map,
    pub headers: Map,
    pub event_id: ImmutableString,
    pub received_at: i64,
}

impl Vars {
    pub fn new(body: Dynamic, c: Constants) -> Vars {
        let mut scope = Scope::with_capacity(SCOPE_NAMES.len() + RESPONSE_NAMES.len() + 8);
        scope
            .push_constant("command", c.command)
            .push_constant("source", c.source)
            .push_constant("dialect", c.dialect)
            .push_constant("app_id", c.app_id)
            .push_constant("query", c.query)
            .push_constant("headers", c.headers)
            .push_constant("event_id", c.event_id)
            .push_constant("received_at", c.received_at)
            // A slot each script's `body` is put in (see `with_scope`).
            .push("body", ());
        Vars {
            scope: Mutex::new((scope, Some(body))),
        }
    }

    /// Runs `f` with the scope for one script: the constants, then `body` and `extra`.
    fn with_scope<R>(
        &self,
        body: Body,
        extra: impl FnOnce(&mut Scope<'static>),
        f: impl FnOnce(&mut Scope<'static>) -> R,
    ) -> R {
        let mut guard = self.scope.lock().unwrap_or_else(|e| e.into_inner());
        let (scope, kept) = &mut *guard;
        let value = match (body, kept.as_ref()) {
            (Body::Unread, _) => Dynamic::UNIT,
            (Body::Copy, Some(value)) => value.clone(),
            (Body::Take, Some(_)) => kept.take().expect("checked"),
            (Body::Copy | Body::Take, None) => {
                // The router gives `body` away only to the last script that reads it.
                debug_assert!(
                    false,
                    "a script that reads body ran after it was given away"
                );
                tracing::error!("a script ran after the one given the callback's body; it sees ()");
                Dynamic::UNIT
            }
        };
        // Into the slot, not pushed: a push walks the whole value to mark it writable, which a
        // body from JSON (or a copy of one) already is.
        let base = scope.len();
        let slot = scope
            .get_mut("body")
            .expect("Vars::new pushes a writable body");
        *slot = value;
        extra(scope);
        let result = f(scope);
        scope.rewind(base);
        // What the script left in `body` goes now, not with the next script's.
        *scope.get_mut("body").expect("the slot survives the rewind") = Dynamic::UNIT;
        result
    }
}

thread_local! {
    /// The route whose script runs on this thread, so `print`/`debug` can name it.
    static CURRENT_ROUTE: RefCell<Option<Arc<str>>> = const { RefCell::new(None) };
}

fn current_route() -> String {
    CURRENT_ROUTE.with(|r| r.borrow().as_deref().unwrap_or("-").to_string())
}

/// The shared engine.
pub struct ScriptEngine {
    engine: Engine,
}

impl std::fmt::Debug for ScriptEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScriptEngine")
    }
}

impl ScriptEngine {
    /// Builds the engine. `import "x"` resolves to `rules_dir/x.rhai` and nowhere else.
    pub fn new(rules_dir: &Path, limits: &Limits) -> ScriptEngine {
        let mut engine = Engine::new();
        engine
            .set_max_operations(limits.max_operations)
            .set_max_call_levels(limits.max_call_levels)
            .set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth)
            .set_max_string_size(limits.max_string_size)
            .set_max_array_size(limits.max_array_size)
            .set_max_map_size(limits.max_map_size)
            .set_max_modules(64)
            .set_strict_variables(true);
        engine.disable_symbol("eval");
        engine.set_module_resolver(RulesDirResolver::new(rules_dir));
        engine.on_print(|text| tracing::info!(route = %current_route(), "script print: {text}"));
        engine.on_debug(|text, _source, pos| {
            tracing::debug!(route = %current_route(), line = pos.line().unwrap_or(0), "script debug: {text}")
        });
        register_helpers(&mut engine);
        ScriptEngine { engine }
    }

    /// Compiles a script for `stage` (which decides the names it may read). Imports with
    /// literal paths are resolved now and embedded, so a module edited later takes effect only
    /// with the next rule load, like everything else.
    pub fn compile(
        &self,
        text: &str,
        origin: ScriptOrigin,
        stage: Stage,
    ) -> Result<Script, CompileError> {
        match self
            .engine
            .compile_into_self_contained(&names_scope(stage, None), text)
        {
            Ok(ast) => Ok(Script {
                ast: Arc::new(ast),
                origin,
                reads: self.reads(text, stage),
            }),
            Err(err) => {
                let (line, col) = origin.locate(err.position());
                Err(CompileError {
                    file: origin.file.clone(),
                    line,
                    col,
                    message: describe(&err),
                })
            }
        }
    }

    /// Which costly values a script that compiles reads. With strict variables, naming a variable
    /// the scope lacks is a compile error, so a script that compiles without `name` in scope does
    /// not read it — Rhai's own parser decides, closures and all. A name the text does not contain
    /// needs no second compile.
    fn reads(&self, text: &str, stage: Stage) -> Reads {
        let reads = |name: &str| {
            text.contains(name)
                && self
                    .engine
                    .compile_with_scope(&names_scope(stage, Some(name)), text)
                    .is_err()
        };
        Reads {
            body: reads("body"),
            query: reads("query"),
            headers: reads("headers"),
        }
    }

    /// Runs a filter; anything but a bool is an error. `last`: no script after it on this
    /// callback reads `body`, so it may have the callback's own rather than a copy.
    pub fn filter(
        &self,
        route: &Arc<str>,
        script: &Script,
        vars: &Vars,
        last: bool,
    ) -> Result<bool, RunError> {
        let value = vars.with_scope(
            Body::for_script(script, last),
            |_| {},
            |scope| self.run(route, script, scope, Stage::Filter),
        )?;
        value.as_bool().map_err(|ty| RunError {
            stage: Stage::Filter,
            message: format!("a filter must evaluate to a bool, not {ty}"),
            location: Some(script.origin.start()),
        })
    }

    /// Runs a transform; a map or array becomes JSON, `()` means "do not deliver". `last` as
    /// for [`ScriptEngine::filter`].
    pub fn transform(
        &self,
        route: &Arc<str>,
        script: &Script,
        vars: &Vars,
        last: bool,
    ) -> Result<TransformOutput, RunError> {
        let value = vars.with_scope(
            Body::for_script(script, last),
            |_| {},
            |scope| self.run(route, script, scope, Stage::Transform),
        )?;
        if value.is_unit() {
            return Ok(TransformOutput::Skip);
        }
        if !(value.is_map() || value.is_array()) {
            return Err(RunError {
                stage: Stage::Transform,
                message: format!(
                    "a transform must return a map, an array or () — it returned {}",
                    value.type_name()
                ),
                location: Some(script.origin.start()),
            });
        }
        serde_json::to_vec(&value)
            .map(TransformOutput::Body)
            .map_err(|e| RunError {
                stage: Stage::Transform,
                message: format!("the result cannot be written as JSON: {e}"),
                location: Some(script.origin.start()),
            })
    }

    /// Runs a `response_transform` on a synchronous target's answer; its value, a map, is the
    /// answer the IM server gets.
    pub fn response_transform(
        &self,
        route: &Arc<str>,
        script: &Script,
        vars: &Vars,
        response: Dynamic,
        status: u16,
    ) -> Result<Vec<u8>, RunError> {
        // It runs after every route; the router gives `body` away only when none reads it.
        let value = vars.with_scope(
            Body::for_script(script, false),
            |scope| {
                scope
                    .push_constant("response", response)
                    .push_constant("status", i64::from(status));
            },
            |scope| self.run(route, script, scope, Stage::Response),
        )?;
        if !value.is_map() {
            return Err(RunError {
                stage: Stage::Response,
                message: format!(
                    "a response_transform must return a map (the answer's JSON object), not {}",
                    value.type_name()
                ),
                location: Some(script.origin.start()),
            });
        }
        serde_json::to_vec(&value).map_err(|e| RunError {
            stage: Stage::Response,
            message: format!("the result cannot be written as JSON: {e}"),
            location: Some(script.origin.start()),
        })
    }

    fn run(
        &self,
        route: &Arc<str>,
        script: &Script,
        scope: &mut Scope<'static>,
        stage: Stage,
    ) -> Result<Dynamic, RunError> {
        CURRENT_ROUTE.with(|r| *r.borrow_mut() = Some(route.clone()));
        let result = self
            .engine
            .eval_ast_with_scope::<Dynamic>(scope, &script.ast);
        CURRENT_ROUTE.with(|r| *r.borrow_mut() = None);
        result.map_err(|err| {
            let pos = err.position();
            let location = (!pos.is_none()).then(|| {
                let (line, _) = script.origin.locate(pos);
                format!("{}:{}", script.origin.file, line)
            });
            RunError {
                stage,
                message: describe(&err),
                location,
            }
        })
    }
}

/// The names a script of `stage` may read, as a scope to compile with, but for `without`.
fn names_scope(stage: Stage, without: Option<&str>) -> Scope<'static> {
    let mut scope = Scope::new();
    for name in SCOPE_NAMES.iter().chain(stage.extra_names()) {
        if Some(*name) != without {
            scope.push_dynamic(*name, Dynamic::UNIT);
        }
    }
    scope
}

/// Rhai's message without its trailing " (line X, position Y)": we print our own location.
fn describe(err: &EvalAltResult) -> String {
    let text = match err {
        EvalAltResult::ErrorParsing(parse, _) => parse.to_string(),
        other => other.to_string(),
    };
    match text.rfind(" (line ") {
        Some(idx) if text.ends_with(')') => text[..idx].to_string(),
        _ => text,
    }
}

/// Converts a JSON document to a Rhai value.
pub fn json_to_dynamic(bytes: &[u8]) -> Result<Dynamic, serde_json::Error> {
    serde_json::from_slice::<Dynamic>(bytes)
}

/// Resolves `import` only to `.rhai` files inside the rules directory.
struct RulesDirResolver {
    base: PathBuf,
    inner: FileModuleResolver,
}

impl RulesDirResolver {
    fn new(base: &Path) -> Self {
        let mut inner = FileModuleResolver::new_with_path(base);
        // Rule loads must see the module as it is now, not as it was at the first load.
        inner.enable_cache(false);
        RulesDirResolver {
            base: base.to_path_buf(),
            inner,
        }
    }
}

impl ModuleResolver for RulesDirResolver {
    fn resolve(
        &self,
        engine: &Engine,
        _source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<Shared<Module>, Box<EvalAltResult>> {
        let relative = Path::new(path);
        let escapes = relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
        if escapes || path.is_empty() {
            return Err(Box::new(EvalAltResult::ErrorInModule(
                path.to_string(),
                format!(
                    "import paths must be relative and stay inside the rules directory ({})",
                    self.base.display()
                )
                .into(),
                pos,
            )));
        }
        // Resolve against the rules directory whatever file imports it.
        self.inner.resolve(engine, None, path, pos)
    }
}

fn register_helpers(engine: &mut Engine) {
    use base64::Engine as _;
    use hmac::Mac;
    use sha2::Digest;

    engine.register_fn(
        "parse_json",
        |text: ImmutableString| -> Result<Dynamic, Box<EvalAltResult>> {
            json_to_dynamic(text.as_bytes()).map_err(|e| format!("parse_json: {e}").into())
        },
    );
    engine.register_fn(
        "to_json",
        |value: Dynamic| -> Result<String, Box<EvalAltResult>> {
            serde_json::to_string(&value).map_err(|e| format!("to_json: {e}").into())
        },
    );
    engine.register_fn("now_ms", || -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    });
    engine.register_fn("sha256_hex", |text: ImmutableString| -> String {
        hex::encode(sha2::Sha256::digest(text.as_bytes()))
    });
    engine.register_fn(
        "hmac_sha256_hex",
        |key: ImmutableString, message: ImmutableString| -> String {
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes())
                .expect("HMAC accepts keys of any length");
            mac.update(message.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        },
    );
    engine.register_fn("base64_encode", |text: ImmutableString| -> String {
        base64::engine::general_purpose::STANDARD.encode(text.as_bytes())
    });
    engine.register_fn(
        "base64_decode",
        |text: ImmutableString| -> Result<String, Box<EvalAltResult>> {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(|e| format!("base64_decode: {e}"))?;
            String::from_utf8(bytes)
                .map_err(|_| "base64_decode: the decoded bytes are not UTF-8 text".into())
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> ScriptEngine {
        ScriptEngine::new(Path::new("."), &Limits::default())
    }

    fn origin() -> ScriptOrigin {
        ScriptOrigin {
            file: "rules/x.yaml".into(),
            first_line: 10,
            first_col: 13,
        }
    }

    fn vars(body: &str) -> Vars {
        Vars::new(
            json_to_dynamic(body.as_bytes()).unwrap(),
            Constants {
                command: "Profile.CallbackPortraitSet".into(),
                source: "tencent-im".into(),
                dialect: "tencent".into(),
                app_id: "1400000000".into(),
                query: Map::new(),
                headers: Map::new(),
                event_id: "ev-1".into(),
                received_at: 1,
            },
        )
    }

    #[test]
    fn scripts_on_one_callback_do_not_see_each_others_changes() {
        let e = engine();
        let route: Arc<str> = "r".into();
        let v = vars(r#"{"From_Account":"u1"}"#);
        let transform = |text: &str| e.compile(text, origin(), Stage::Transform).unwrap();
        let changer = transform(
            r#"body.From_Account = "changed"; body.Extra = 1; let command = "mine"; body"#,
        );
        let reader = transform(
            r#"#{from: body.From_Account, extra: body.Extra, command: command, app_id: app_id}"#,
        );
        let json = |out: TransformOutput| match out {
            TransformOutput::Body(b) => serde_json::from_slice::<serde_json::Value>(&b).unwrap(),
            TransformOutput::Skip => panic!("skipped"),
        };
        let changed = json(e.transform(&route, &changer, &v, false).unwrap());
        assert_eq!(changed["From_Account"], "changed");
        assert_eq!(changed["Extra"], 1);
        // The second script gets the callback as it came, however often the first one runs.
        for _ in 0..2 {
            let seen = json(e.transform(&route, &reader, &v, false).unwrap());
            assert_eq!(
                seen,
                serde_json::json!({"from": "u1", "extra": null, "command": "Profile.CallbackPortraitSet", "app_id": "1400000000"})
            );
            e.transform(&route, &changer, &v, false).unwrap();
        }
        // Nor through a closure that captured it (which makes the variable a shared value).
        let capturer =
            transform(r#"let f = || { body.From_Account = "captured"; }; f.call(); body"#);
        let changed = json(e.transform(&route, &capturer, &v, false).unwrap());
        assert_eq!(changed["From_Account"], "captured");
        let seen = json(e.transform(&route, &reader, &v, false).unwrap());
        assert_eq!(seen["from"], "u1");
        // A failing script leaves nothing behind either.
        let failing = transform(r#"let app_id = "x"; body.Extra = 2; throw "no""#);
        assert!(e.transform(&route, &failing, &v, false).is_err());
        let seen = json(e.transform(&route, &reader, &v, false).unwrap());
        assert_eq!(seen["app_id"], "1400000000");
        assert_eq!(seen["extra"], serde_json::Value::Null);
    }

    #[test]
    fn what_a_script_reads_is_what_it_names_as_a_variable() {
        let e = engine();
        let reads = |text: &str| e.compile(text, origin(), Stage::Filter).unwrap().reads;
        let only = |body, query, headers| Reads {
            body,
            query,
            headers,
        };
        assert_eq!(reads("body.x == 1"), only(true, false, false));
        assert_eq!(reads(r#"headers["x-id"] == "1""#), only(false, false, true));
        // Inside a closure, and through `?.`.
        assert_eq!(
            reads(r#"[1].some(|i| query?.a == "1")"#),
            only(false, true, false)
        );
        // In a string or a comment, as a function's parameter or a variable of the script's own.
        assert_eq!(
            reads("// body\n\"body headers query\" == command"),
            Reads::NONE
        );
        assert_eq!(reads("fn f(body) { body.x } f(#{x: 1}) == 1"), Reads::NONE);
        assert_eq!(reads("let headers = #{}; headers.x == ()"), Reads::NONE);
        assert_eq!(
            reads("let h = headers; body.a == h.b && query.c == ()"),
            only(true, true, true)
        );
    }

    #[test]
    fn filter_reads_body_and_scope() {
        let e = engine();
        let s = e
            .compile(
                r#"body.ProfileItem.some(|i| i.Tag == "Tag_Profile_IM_Nick") && app_id == "1400000000""#, origin(), Stage::Filter)
            .unwrap();
        let route: Arc<str> = "r".into();
        let v = vars(r#"{"ProfileItem":[{"Tag":"Tag_Profile_IM_Nick","Value":"n"}]}"#);
        assert!(e.filter(&route, &s, &v, false).unwrap());
        let v = vars(r#"{"ProfileItem":[{"Tag":"Tag_Profile_IM_Gender","Value":"n"}]}"#);
        assert!(!e.filter(&route, &s, &v, false).unwrap());
    }

    #[test]
    fn transform_outputs_json_or_skip() {
        let e = engine();
        let route: Arc<str> = "r".into();
        let s = e
            .compile(
                r#"#{ user: body.From_Account, cmd: command, n: 1 }"#,
                origin(),
                Stage::Filter,
            )
            .unwrap();
        let TransformOutput::Body(out) = e
            .transform(&route, &s, &vars(r#"{"From_Account":"id1"}"#), true)
            .unwrap()
        else {
            panic!("skipped")
        };
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"user":"id1","cmd":"Profile.CallbackPortraitSet","n":1})
        );
        let s = e
            .compile(
                "if body.x == 1 { () } else { body }",
                origin(),
                Stage::Filter,
            )
            .unwrap();
        assert!(matches!(
            e.transform(&route, &s, &vars(r#"{"x":1}"#), true).unwrap(),
            TransformOutput::Skip
        ));
    }

    #[test]
    fn compile_errors_are_located_in_the_rule_file() {
        let e = engine();
        let err = e.compile("body.x ==", origin(), Stage::Filter).unwrap_err();
        assert_eq!(err.line, 10);
        let err = e
            .compile("true\n && nosuchvar", origin(), Stage::Filter)
            .unwrap_err();
        assert_eq!(err.line, 11, "{err:?}");
        assert!(err.message.contains("nosuchvar"), "{err:?}");
    }

    #[test]
    fn limits_stop_runaway_scripts() {
        let e = engine();
        let route: Arc<str> = "r".into();
        let s = e.compile("loop { }", origin(), Stage::Filter).unwrap();
        let err = e.filter(&route, &s, &vars("{}"), true).unwrap_err();
        assert!(err.message.contains("operations"), "{err:?}");
        let s = e
            .compile(
                "let s = \"x\"; loop { s += s; } true",
                origin(),
                Stage::Filter,
            )
            .unwrap();
        assert!(e.filter(&route, &s, &vars("{}"), true).is_err());
        let s = e
            .compile("fn f(x) { f(x) } f(1)", origin(), Stage::Filter)
            .unwrap();
        assert!(e.filter(&route, &s, &vars("{}"), true).is_err());
    }

    #[test]
    fn eval_and_escaping_imports_are_refused() {
        let e = engine();
        assert!(e.compile(r#"eval("1")"#, origin(), Stage::Filter).is_err());
        let err = e
            .compile(
                r#"import "../etc/passwd" as p; true"#,
                origin(),
                Stage::Filter,
            )
            .unwrap_err();
        assert!(err.message.contains("rules directory"), "{err:?}");
    }

    #[test]
    fn helpers() {
        let e = engine();
        let route: Arc<str> = "r".into();
        let s = e
            .compile(
                r#"sha256_hex("xxxxyyyy1669872112") == "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061"
                   && base64_decode(base64_encode("hé")) == "hé"
                   && parse_json("{\"a\":[1,2]}").a[1] == 2
                   && to_json(#{a: 1}) == "{\"a\":1}"
                   && hmac_sha256_hex("key", "The quick brown fox jumps over the lazy dog") == "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
                   && now_ms() > 0"#,
                origin(),
                Stage::Filter,
            )
            .unwrap();
        assert!(e.filter(&route, &s, &vars("{}"), true).unwrap());
    }

    #[test]
    fn runtime_errors_name_stage_and_line() {
        let e = engine();
        let route: Arc<str> = "r".into();
        let s = e
            .compile(
                "let x = 1;\nx + body.missing.deeper",
                origin(),
                Stage::Filter,
            )
            .unwrap();
        let err = e.filter(&route, &s, &vars("{}"), true).unwrap_err();
        assert_eq!(err.stage, Stage::Filter);
        assert_eq!(err.location.as_deref(), Some("rules/x.yaml:11"), "{err:?}");
        let s = e.compile("42", origin(), Stage::Filter).unwrap();
        assert!(e.filter(&route, &s, &vars("{}"), true).is_err());
        assert!(e.transform(&route, &s, &vars("{}"), true).is_err());
    }

    #[test]
    fn response_transform_reads_the_answer_and_returns_a_map() {
        let e = engine();
        let route: Arc<str> = "r".into();
        let text = r#"#{ ErrorCode: if response.verdict == "block" { 1 } else { 0 }, Status: status, Cmd: command }"#;
        // `response` and `status` exist only for this stage.
        assert!(e.compile(text, origin(), Stage::Transform).is_err());
        let s = e.compile(text, origin(), Stage::Response).unwrap();
        let answer = json_to_dynamic(br#"{"verdict":"block"}"#).unwrap();
        let out = e
            .response_transform(&route, &s, &vars("{}"), answer, 200)
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"ErrorCode":1,"Status":200,"Cmd":"Profile.CallbackPortraitSet"})
        );
        let s = e.compile("[1, 2]", origin(), Stage::Response).unwrap();
        let err = e
            .response_transform(&route, &s, &vars("{}"), Dynamic::UNIT, 200)
            .unwrap_err();
        assert_eq!(err.stage, Stage::Response);
        assert!(err.message.contains("must return a map"), "{err:?}");
    }
}
