//! Rules directory → `RuleSet`, with every error of the load as `FILE:LINE:COL: message`.
//!
//! Loading never stops at the first problem: each file is read whole, each entry checked field by
//! field, then names, references and scripts are checked across files, so one run of `check`
//! lists everything a platform engineer has to fix. Nothing here touches the running server: a
//! load either produces a complete `RuleSet` or a list of errors.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;

use super::text::{expand_env, parse_duration, parse_size};
use super::yaml::{self, Key, Node, Pos, Value};
use super::{
    CommandLocation, Glob, OnRespondFailure, Origin, RetryPolicy, Route, RuleSet, Source, Target,
    UrlTemplate,
};
use crate::dialect::DialectKind;
use crate::script::{Script, ScriptEngine, ScriptOrigin, Stage};

/// Largest rule or script file read.
const MAX_FILE: u64 = 4 << 20;

/// A source's `respond_timeout` when it gives none: inside Tencent's 2 s, with room for the
/// network between the IM server and the gateway.
pub const DEFAULT_RESPOND_TIMEOUT: Duration = Duration::from_millis(1500);
/// No IM server waits longer than this for an answer.
const MAX_RESPOND_TIMEOUT: Duration = Duration::from_secs(60);

/// One problem found by a load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    pub file: String,
    /// 0 when the problem has no position (an unreadable directory, say).
    pub line: u32,
    pub col: u32,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.col, self.message
            )
        }
    }
}

/// Every problem of a failed load, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadErrors(pub Vec<LoadError>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadErrors {}

/// Loads the rules directory with the process environment for `${VAR}`.
pub fn load(dir: &Path, engine: &ScriptEngine) -> Result<RuleSet, LoadErrors> {
    load_with_env(dir, engine, &|name| std::env::var(name).ok())
}

/// Loads the rules directory, resolving `${VAR}` with `env`.
pub fn load_with_env(
    dir: &Path,
    engine: &ScriptEngine,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RuleSet, LoadErrors> {
    let mut errors = Vec::new();
    let mut hasher = DefaultHasher::new();
    let files = match rule_files(dir) {
        Ok(files) => files,
        Err(message) => {
            return Err(LoadErrors(vec![LoadError {
                file: dir.display().to_string(),
                line: 0,
                col: 0,
                message,
            }]))
        }
    };
    if files.is_empty() {
        return Err(LoadErrors(vec![LoadError {
            file: dir.display().to_string(),
            line: 0,
            col: 0,
            message: "no rule files (*.yaml, *.yml) in the rules directory".into(),
        }]));
    }

    let mut raw = RawRules::default();
    for path in &files {
        let file: Arc<str> = path.display().to_string().into();
        let text = match read_text(path) {
            Ok(text) => text,
            Err(message) => {
                errors.push(LoadError {
                    file: file.to_string(),
                    line: 0,
                    col: 0,
                    message,
                });
                continue;
            }
        };
        path.hash(&mut hasher);
        text.hash(&mut hasher);
        let mut ctx = Ctx {
            file: file.clone(),
            text: &text,
            errors: &mut errors,
            env,
        };
        match yaml::parse(&text) {
            Ok(node) => read_file(&mut ctx, &node, &mut raw),
            Err(e) => ctx.error(e.pos, e.message),
        }
    }

    let rules = resolve(dir, engine, raw, &mut errors);
    hash_scripts(dir, 0, &mut hasher);
    if errors.is_empty() {
        let (sources, targets, routes) = rules;
        Ok(RuleSet::new(
            dir.to_path_buf(),
            files,
            sources,
            targets,
            routes,
            hasher.finish(),
        ))
    } else {
        Err(LoadErrors(errors))
    }
}

/// `*.yaml` / `*.yml` directly in `dir`, by file name; hidden files (editor locks, ConfigMap
/// internals) are skipped. Symlinks are followed.
fn rule_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read the rules directory: {e}"))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read the rules directory: {e}"))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let path = dir.join(name);
        if std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Hashes every `.rhai` file under `dir` (scripts and the modules they import), so that editing
/// any of them is a change, not only the files rules name directly.
fn hash_scripts(dir: &Path, depth: u32, hasher: &mut DefaultHasher) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.extension().is_some_and(|e| e == "rhai") {
            if let Ok(bytes) = std::fs::read(&path) {
                path.hash(hasher);
                bytes.hash(hasher);
            }
        } else if depth < 4 && path.is_dir() {
            hash_scripts(&path, depth + 1, hasher);
        }
    }
}

fn read_text(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() > MAX_FILE {
        return Err(format!("file is larger than {} bytes", MAX_FILE));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    String::from_utf8(bytes).map_err(|_| "file is not UTF-8 text".to_string())
}

struct Ctx<'a> {
    file: Arc<str>,
    text: &'a str,
    errors: &'a mut Vec<LoadError>,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Ctx<'_> {
    fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.errors.push(LoadError {
            file: self.file.to_string(),
            line: pos.line,
            col: pos.col,
            message: message.into(),
        });
    }

    fn origin(&self, pos: Pos) -> Origin {
        Origin {
            file: self.file.clone(),
            line: pos.line,
            col: pos.col,
        }
    }

    fn map<'n>(&mut self, node: &'n Node, what: &str) -> Option<Fields<'n>> {
        match &node.value {
            Value::Map(entries) => Some(Fields {
                what: what.to_string(),
                entries,
                taken: vec![false; entries.len()],
                known: Vec::new(),
            }),
            Value::Null => Some(Fields {
                what: what.to_string(),
                entries: &[],
                taken: Vec::new(),
                known: Vec::new(),
            }),
            other => {
                self.error(
                    node.pos,
                    format!("{what} must be a mapping, found {}", other.kind()),
                );
                None
            }
        }
    }

    /// A scalar as text, with `${VAR}` expanded.
    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        let raw = self.raw_string(node, what)?;
        match expand_env(&raw, self.env) {
            Ok(s) => Some(s),
            Err(message) => {
                self.error(node.pos, format!("{what}: {message}"));
                None
            }
        }
    }

    /// A scalar as text, exactly as written (scripts: Rhai has its own `${…}`).
    fn raw_string(&mut self, node: &Node, what: &str) -> Option<String> {
        node.scalar_text(what)
            .map_err(|message| self.error(node.pos, message))
            .ok()
    }

    /// A list of strings; a single string is a list of one.
    fn string_list(&mut self, node: &Node, what: &str) -> Option<Vec<(Pos, String)>> {
        match &node.value {
            Value::Seq(items) => {
                let mut out = Vec::with_capacity(items.len());
                let mut ok = true;
                for item in items {
                    match self.string(item, what) {
                        Some(s) => out.push((item.pos, s)),
                        None => ok = false,
                    }
                }
                ok.then_some(out)
            }
            Value::Str(_) | Value::Int(_) => self.string(node, what).map(|s| vec![(node.pos, s)]),
            other => {
                self.error(
                    node.pos,
                    format!("{what} must be a list of strings, found {}", other.kind()),
                );
                None
            }
        }
    }

    /// A route's `sources` / `commands`: an empty list would match nothing, which is never what
    /// was meant, so it is an error rather than a route that silently never fires.
    fn selector_list(&mut self, node: &Node, key: &str, each: &str) -> Option<Vec<(Pos, String)>> {
        let list = self.string_list(node, key)?;
        if list.is_empty() {
            self.error(
                node.pos,
                format!(
                    "`{key}` is empty and would match nothing; leave it out to match every {each}"
                ),
            );
            return None;
        }
        Some(list)
    }

    fn integer(&mut self, node: &Node, what: &str, min: u64, max: u64) -> Option<u64> {
        let n = match &node.value {
            Value::Int(i) => u64::try_from(*i).ok(),
            Value::Str(_) => self.string(node, what)?.trim().parse::<u64>().ok(),
            _ => None,
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.error(
                    node.pos,
                    format!("{what} must be a whole number from {min} to {max}"),
                );
                None
            }
        }
    }

    fn duration(&mut self, node: &Node, what: &str) -> Option<Duration> {
        if let Value::Int(_) | Value::Float(_) = node.value {
            self.error(
                node.pos,
                format!("{what} needs a unit, e.g. 500ms, 5s, 10m, 1h"),
            );
            return None;
        }
        let text = self.string(node, what)?;
        match parse_duration(&text) {
            Ok(d) => Some(d),
            Err(m) => {
                self.error(node.pos, format!("{what}: {m}"));
                None
            }
        }
    }

    fn size(&mut self, node: &Node, what: &str) -> Option<u64> {
        let text = self.string(node, what)?;
        match parse_size(&text) {
            Ok(n) => Some(n),
            Err(m) => {
                self.error(node.pos, format!("{what}: {m}"));
                None
            }
        }
    }

    /// Where an inline script's first character is, for Rhai positions.
    fn inline_script_origin(&self, node: &Node) -> ScriptOrigin {
        let line_text = self
            .text
            .lines()
            .nth(node.pos.line.saturating_sub(1) as usize)
            .unwrap_or("");
        let first = line_text
            .chars()
            .nth(node.pos.col.saturating_sub(1) as usize);
        let (first_line, first_col) = match first {
            Some('\'' | '"') => (node.pos.line, node.pos.col + 1),
            Some('|' | '>') => {
                let next = self.text.lines().nth(node.pos.line as usize).unwrap_or("");
                let indent = next.chars().take_while(|c| *c == ' ').count() as u32;
                (node.pos.line + 1, indent + 1)
            }
            _ => (node.pos.line, node.pos.col),
        };
        ScriptOrigin {
            file: self.file.clone(),
            first_line,
            first_col,
        }
    }
}

/// The keys of one mapping, taken one by one; whatever is left over is an unknown key.
struct Fields<'n> {
    what: String,
    entries: &'n [(Key, Node)],
    taken: Vec<bool>,
    known: Vec<&'static str>,
}

impl<'n> Fields<'n> {
    fn take(&mut self, name: &'static str) -> Option<&'n Node> {
        self.known.push(name);
        let i = self.entries.iter().position(|(k, _)| k.name == name)?;
        self.taken[i] = true;
        Some(&self.entries[i].1)
    }

    fn finish(self, ctx: &mut Ctx<'_>) {
        for (i, (key, _)) in self.entries.iter().enumerate() {
            if self.taken[i] {
                continue;
            }
            let hint = match closest(&key.name, &self.known) {
                Some(k) => format!("; did you mean `{k}`?"),
                None => format!("; known keys: {}", self.known.join(", ")),
            };
            ctx.error(
                key.pos,
                format!("unknown key `{}` in {}{hint}", key.name, self.what),
            );
        }
    }
}

/// The known name within edit distance 2 of `name`, if any.
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

// ---- first pass: each file on its own ------------------------------------------------------

#[derive(Default)]
struct RawRules {
    sources: Vec<Named<Source>>,
    targets: Vec<Named<Target>>,
    routes: Vec<RawRoute>,
}

enum ScriptText {
    Inline(String, ScriptOrigin),
    File(String, Origin),
}

struct RawRoute {
    name: Arc<str>,
    origin: Origin,
    sources: Option<Vec<(Origin, Arc<str>)>>,
    commands: Option<Vec<Glob>>,
    filter: Option<ScriptText>,
    transform: Option<ScriptText>,
    response_transform: Option<ScriptText>,
    respond: bool,
    to: Vec<(Origin, Arc<str>)>,
    valid: bool,
}

fn read_file(ctx: &mut Ctx<'_>, node: &Node, raw: &mut RawRules) {
    let Some(mut top) = ctx.map(node, "a rule file") else {
        return;
    };
    if let Some(sources) = top.take("sources") {
        read_named(ctx, sources, "sources", read_source, &mut raw.sources);
    }
    if let Some(targets) = top.take("targets") {
        read_named(ctx, targets, "targets", read_target, &mut raw.targets);
    }
    if let Some(routes) = top.take("routes") {
        match &routes.value {
            Value::Seq(items) => {
                for item in items {
                    if let Some(route) = read_route(ctx, item) {
                        raw.routes.push(route);
                    }
                }
            }
            Value::Null => {}
            other => ctx.error(
                routes.pos,
                format!("`routes` must be a list of routes, found {}", other.kind()),
            ),
        }
    }
    top.finish(ctx);
}

type EntryReader<T> = fn(&mut Ctx<'_>, &str, &Node, Origin) -> Option<T>;

/// Reads a `name: {…}` mapping (sources, targets) entry by entry.
fn read_named<T>(
    ctx: &mut Ctx<'_>,
    node: &Node,
    key: &str,
    read: EntryReader<T>,
    out: &mut Vec<Named<T>>,
) {
    match &node.value {
        Value::Map(entries) => {
            for (name, value) in entries {
                let origin = ctx.origin(name.pos);
                let entry = read(ctx, &name.name, value, origin.clone());
                out.push((origin, name.name.clone(), entry));
            }
        }
        Value::Null => {}
        other => ctx.error(
            node.pos,
            format!(
                "`{key}` must be a mapping of names to definitions, found {}",
                other.kind()
            ),
        ),
    }
}

fn read_source(ctx: &mut Ctx<'_>, name: &str, node: &Node, origin: Origin) -> Option<Source> {
    let what = format!("source `{name}`");
    let mut f = ctx.map(node, &what)?;
    let path = f.take("path");
    let dialect = f.take("dialect");
    let app_ids = f.take("app_ids");
    let token = f.take("token");
    let skew = f.take("max_clock_skew");
    let max_body = f.take("max_body");
    let command = f.take("command");
    let respond_timeout = f.take("respond_timeout");
    let on_respond_failure = f.take("on_respond_failure");
    f.finish(ctx);
    let mut ok = check_name(ctx, name, origin.line, origin.col, "source");

    let path = match path {
        None => {
            ctx.error(pos_of(&origin), format!("{what} needs a `path`"));
            None
        }
        Some(n) => ctx.string(n, "path").and_then(|p| match check_path(&p) {
            Ok(()) => Some(p),
            Err(m) => {
                ctx.error(n.pos, m);
                None
            }
        }),
    };
    let dialect = match dialect {
        None => {
            ctx.error(
                pos_of(&origin),
                format!("{what} needs a `dialect` (tencent, openim or generic)"),
            );
            None
        }
        Some(n) => ctx
            .string(n, "dialect")
            .and_then(|d| match DialectKind::parse(&d) {
                Some(k) => Some(k),
                None => {
                    ctx.error(
                        n.pos,
                        format!("unknown dialect `{d}`; expected tencent, openim or generic"),
                    );
                    None
                }
            }),
    };

    let tencent_only = |ctx: &mut Ctx<'_>, n: Option<&Node>, key: &str| {
        if let (Some(n), Some(d)) = (n, dialect) {
            if d != DialectKind::Tencent {
                ctx.error(n.pos, format!("`{key}` applies only to tencent sources"));
                return false;
            }
        }
        true
    };
    ok &= tencent_only(ctx, app_ids, "app_ids");
    ok &= tencent_only(ctx, token, "token");
    ok &= tencent_only(ctx, skew, "max_clock_skew");

    let app_ids = match app_ids {
        Some(n) => ctx
            .string_list(n, "app_ids")
            .map(|v| v.into_iter().map(|(_, s)| s.trim().to_string()).collect()),
        None => Some(Vec::new()),
    };
    if dialect == Some(DialectKind::Tencent) && app_ids.as_ref().is_some_and(Vec::is_empty) {
        ctx.error(
            pos_of(&origin),
            format!("{what} needs `app_ids`: the SdkAppid values it accepts"),
        );
        ok = false;
    }
    let token = match token {
        Some(n) => ctx.string(n, "token").map(|t| (!t.is_empty()).then_some(t)),
        None => Some(None),
    };
    let skew = match skew {
        Some(n) => ctx.duration(n, "max_clock_skew"),
        None => Some(Duration::from_secs(60)),
    };
    let max_body = match max_body {
        Some(n) => ctx.size(n, "max_body").and_then(|s| {
            if s == 0 || s > (64 << 20) {
                ctx.error(n.pos, "max_body must be between 1 byte and 64MiB");
                None
            } else {
                Some(s as usize)
            }
        }),
        None => Some(1 << 20),
    };
    let command = match command {
        None => Some(CommandLocation::None),
        Some(n) => {
            if dialect.is_some_and(|d| d != DialectKind::Generic) {
                ctx.error(n.pos, "`command` applies only to generic sources");
                None
            } else {
                ctx.string(n, "command")
                    .and_then(|c| match parse_command_location(&c) {
                        Ok(c) => Some(c),
                        Err(m) => {
                            ctx.error(n.pos, m);
                            None
                        }
                    })
            }
        }
    };
    let respond_timeout = match respond_timeout {
        None => Some(DEFAULT_RESPOND_TIMEOUT),
        Some(n) => ctx.duration(n, "respond_timeout").and_then(|d| {
            if d.is_zero() || d > MAX_RESPOND_TIMEOUT {
                ctx.error(
                    n.pos,
                    format!(
                        "respond_timeout must be more than 0 and at most {}s",
                        MAX_RESPOND_TIMEOUT.as_secs()
                    ),
                );
                None
            } else {
                Some(d)
            }
        }),
    };
    let on_respond_failure = match on_respond_failure {
        None => Some(OnRespondFailure::Allow),
        Some(n) => ctx
            .string(n, "on_respond_failure")
            .and_then(|v| match v.as_str() {
                "allow" => Some(OnRespondFailure::Allow),
                "deny" => Some(OnRespondFailure::Deny),
                other => {
                    ctx.error(
                        n.pos,
                        format!("on_respond_failure must be `allow` or `deny`, not `{other}`"),
                    );
                    None
                }
            }),
    };
    Some(Source {
        name: name.into(),
        path: path?,
        dialect: dialect?,
        app_ids: app_ids?,
        token: token?,
        max_clock_skew: skew?,
        max_body: max_body?,
        command: command?,
        respond_timeout: respond_timeout?,
        on_respond_failure: on_respond_failure?,
        origin,
    })
    .filter(|_| ok)
}

fn pos_of(origin: &Origin) -> Pos {
    Pos {
        line: origin.line,
        col: origin.col,
    }
}

fn check_name(ctx: &mut Ctx<'_>, name: &str, line: u32, col: u32, kind: &str) -> bool {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        ctx.error(
            Pos { line, col },
            format!(
                "{kind} name `{name}` must be 1-128 characters of letters, digits, '-', '_' or '.'"
            ),
        );
    }
    valid
}

fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("path `{path}` must start with '/'"));
    }
    if path.len() > 1 && path.ends_with('/') {
        return Err(format!("path `{path}` must not end with '/'"));
    }
    if path.contains(['?', '#', ' ']) || path.contains("//") {
        return Err(format!(
            "path `{path}` must be a plain URL path (no '?', '#', spaces or '//')"
        ));
    }
    Ok(())
}

fn parse_command_location(text: &str) -> Result<CommandLocation, String> {
    let bad =
        || format!("command `{text}` must be body.<dotted.path>, header.<name> or query.<name>");
    let (kind, rest) = text.split_once('.').ok_or_else(bad)?;
    if rest.is_empty() {
        return Err(bad());
    }
    match kind {
        "body" => {
            let parts: Vec<String> = rest.split('.').map(str::to_string).collect();
            if parts.iter().any(String::is_empty) {
                return Err(bad());
            }
            Ok(CommandLocation::Body(parts))
        }
        "header" => http::HeaderName::from_bytes(rest.as_bytes())
            .map(|h| CommandLocation::Header(h.as_str().to_string()))
            .map_err(|_| format!("`{rest}` is not a valid header name")),
        "query" => Ok(CommandLocation::Query(rest.to_string())),
        _ => Err(bad()),
    }
}

/// Headers switchyard sets itself on every delivery.
fn reserved_header(name: &str) -> bool {
    name.starts_with("webhook-")
        || name.starts_with("x-switchyard-")
        || matches!(
            name,
            "content-type" | "content-length" | "host" | "transfer-encoding" | "connection"
        )
}

fn read_target(ctx: &mut Ctx<'_>, name: &str, node: &Node, origin: Origin) -> Option<Target> {
    let what = format!("target `{name}`");
    let mut f = ctx.map(node, &what)?;
    let url = f.take("url");
    let method = f.take("method");
    let headers = f.take("headers");
    let timeout = f.take("timeout");
    let concurrency = f.take("concurrency");
    let retry = f.take("retry");
    let secret = f.take("signing_secret");
    f.finish(ctx);
    let ok = check_name(ctx, name, origin.line, origin.col, "target");

    let url = match url {
        None => {
            ctx.error(pos_of(&origin), format!("{what} needs a `url`"));
            None
        }
        Some(n) => ctx
            .string(n, "url")
            .and_then(|u| match UrlTemplate::parse(&u) {
                Ok(t) => Some(t),
                Err(m) => {
                    ctx.error(n.pos, m);
                    None
                }
            }),
    };
    let method = match method {
        None => Some(http::Method::POST),
        Some(n) => ctx.string(n, "method").and_then(|m| {
            match http::Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes()) {
                Ok(m) => Some(m),
                Err(_) => {
                    ctx.error(n.pos, format!("`{m}` is not an HTTP method"));
                    None
                }
            }
        }),
    };
    let headers = match headers {
        None => Some(http::HeaderMap::new()),
        Some(n) => read_headers(ctx, n),
    };
    let timeout = match timeout {
        None => Some(Duration::from_secs(10)),
        Some(n) => ctx.duration(n, "timeout").and_then(|d| {
            if d.is_zero() {
                ctx.error(n.pos, "timeout must be more than 0");
                None
            } else {
                Some(d)
            }
        }),
    };
    let concurrency = match concurrency {
        None => Some(32),
        Some(n) => ctx.integer(n, "concurrency", 1, 10_000).map(|c| c as usize),
    };
    let retry = match retry {
        None => Some(RetryPolicy::default()),
        Some(n) => read_retry(ctx, n, name),
    };
    let signing_key = match secret {
        None => Some(None),
        Some(n) => ctx.string(n, "signing_secret").and_then(|s| {
            if s.is_empty() {
                return Some(None);
            }
            match decode_signing_secret(&s) {
                Ok(key) => Some(Some(key)),
                Err(m) => {
                    ctx.error(n.pos, m);
                    None
                }
            }
        }),
    };
    Some(Target {
        name: name.into(),
        url: url?,
        method: method?,
        headers: headers?,
        timeout: timeout?,
        concurrency: concurrency?,
        retry: retry?,
        signing_key: signing_key?,
        origin,
    })
    .filter(|_| ok)
}

fn read_headers(ctx: &mut Ctx<'_>, node: &Node) -> Option<http::HeaderMap> {
    let Value::Map(entries) = &node.value else {
        ctx.error(
            node.pos,
            format!("headers must be a mapping, found {}", node.value.kind()),
        );
        return None;
    };
    let mut map = http::HeaderMap::new();
    let mut ok = true;
    for (key, value) in entries {
        let Ok(name) = http::HeaderName::from_bytes(key.name.as_bytes()) else {
            ctx.error(
                key.pos,
                format!("`{}` is not a valid header name", key.name),
            );
            ok = false;
            continue;
        };
        if reserved_header(name.as_str()) {
            ctx.error(
                key.pos,
                format!(
                    "header `{}` is set by switchyard and cannot be configured",
                    key.name
                ),
            );
            ok = false;
            continue;
        }
        let Some(text) = ctx.string(value, "header value") else {
            ok = false;
            continue;
        };
        match http::HeaderValue::from_str(&text) {
            Ok(v) => {
                map.append(name, v);
            }
            Err(_) => {
                ctx.error(
                    value.pos,
                    format!(
                        "the value of header `{}` has characters not allowed in a header",
                        key.name
                    ),
                );
                ok = false;
            }
        }
    }
    ok.then_some(map)
}

fn read_retry(ctx: &mut Ctx<'_>, node: &Node, target: &str) -> Option<RetryPolicy> {
    let mut f = ctx.map(node, &format!("`retry` of target `{target}`"))?;
    let attempts = f.take("max_attempts");
    let backoff = f.take("backoff");
    let max_backoff = f.take("max_backoff");
    f.finish(ctx);
    let d = RetryPolicy::default();
    let attempts = match attempts {
        None => Some(d.max_attempts),
        Some(n) => ctx.integer(n, "max_attempts", 1, 1000).map(|n| n as u32),
    };
    let backoff = match backoff {
        None => Some(d.backoff),
        Some(n) => ctx.duration(n, "backoff"),
    };
    let max_backoff = match max_backoff {
        None => Some(d.max_backoff),
        Some(n) => ctx.duration(n, "max_backoff"),
    };
    let (attempts, backoff, max_backoff) = (attempts?, backoff?, max_backoff?);
    if max_backoff < backoff {
        ctx.error(node.pos, "max_backoff must not be less than backoff");
        return None;
    }
    Some(RetryPolicy {
        max_attempts: attempts,
        backoff,
        max_backoff,
    })
}

/// `whsec_<base64>` → key bytes (the Standard Webhooks secret format).
pub fn decode_signing_secret(secret: &str) -> Result<Vec<u8>, String> {
    let Some(b64) = secret.strip_prefix("whsec_") else {
        return Err("signing_secret must be `whsec_` followed by a base64 key (the Standard Webhooks format)".into());
    };
    match base64::engine::general_purpose::STANDARD.decode(b64) {
        Ok(key) if key.len() >= 16 => Ok(key),
        Ok(_) => Err(
            "signing_secret key is too short: use at least 16 bytes (24 base64 characters)".into(),
        ),
        Err(e) => Err(format!(
            "signing_secret is not valid base64 after `whsec_`: {e}"
        )),
    }
}

fn read_route(ctx: &mut Ctx<'_>, node: &Node) -> Option<RawRoute> {
    let mut f = ctx.map(node, "a route")?;
    let name = f.take("name");
    let sources = f.take("sources");
    let commands = f.take("commands");
    let filter = f.take("filter");
    let filter_file = f.take("filter_file");
    let transform = f.take("transform");
    let transform_file = f.take("transform_file");
    let to = f.take("to");
    let respond = f.take("respond");
    let response_transform = f.take("response_transform");
    let response_transform_file = f.take("response_transform_file");
    let name_text = name.and_then(|n| ctx.string(n, "name"));
    f.what = match &name_text {
        Some(n) => format!("route `{n}`"),
        None => "a route".to_string(),
    };
    f.finish(ctx);

    let mut valid = true;
    let Some(name_text) = name_text else {
        if name.is_none() {
            ctx.error(node.pos, "a route needs a `name`");
        }
        return None;
    };
    let name_pos = name.map(|n| n.pos).unwrap_or(node.pos);
    valid &= check_name(ctx, &name_text, name_pos.line, name_pos.col, "route");
    let origin = ctx.origin(name_pos);

    let sources = match sources {
        None => None,
        Some(n) => match ctx.selector_list(n, "sources", "source") {
            Some(list) => Some(
                list.into_iter()
                    .map(|(pos, s)| (ctx.origin(pos), Arc::<str>::from(s)))
                    .collect(),
            ),
            None => {
                valid = false;
                None
            }
        },
    };
    let commands = match commands {
        None => None,
        Some(n) => match ctx.selector_list(n, "commands", "command") {
            Some(list) => Some(list.into_iter().map(|(_, s)| Glob::new(&s)).collect()),
            None => {
                valid = false;
                None
            }
        },
    };
    let mut script =
        |inline: Option<&Node>, file: Option<&Node>, key: &str| -> Option<ScriptText> {
            match (inline, file) {
                (Some(i), Some(_)) => {
                    ctx.error(i.pos, format!("give `{key}` or `{key}_file`, not both"));
                    valid = false;
                    None
                }
                (Some(i), None) => ctx
                    .raw_string(i, key)
                    .map(|text| ScriptText::Inline(text, ctx.inline_script_origin(i))),
                (None, Some(p)) => ctx
                    .string(p, &format!("{key}_file"))
                    .map(|path| ScriptText::File(path, ctx.origin(p.pos))),
                (None, None) => None,
            }
        };
    let filter = script(filter, filter_file, "filter");
    let transform = script(transform, transform_file, "transform");
    let response_pos = response_transform
        .or(response_transform_file)
        .map(|n| n.pos);
    let response_transform = script(
        response_transform,
        response_transform_file,
        "response_transform",
    );
    let respond = match respond {
        None => false,
        Some(n) => match &n.value {
            Value::Bool(b) => *b,
            other => {
                ctx.error(
                    n.pos,
                    format!("respond must be true or false, found {}", other.kind()),
                );
                valid = false;
                false
            }
        },
    };
    if let (Some(pos), false) = (response_pos, respond) {
        ctx.error(
            pos,
            "response_transform shapes a synchronous answer: it needs `respond: true`",
        );
        valid = false;
    }
    let to = match to {
        None => {
            ctx.error(
                node.pos,
                format!("route `{name_text}` needs `to`: the targets it delivers to"),
            );
            valid = false;
            Vec::new()
        }
        Some(n) => match ctx.string_list(n, "to") {
            Some(list) if list.is_empty() => {
                ctx.error(n.pos, "`to` must name at least one target");
                valid = false;
                Vec::new()
            }
            Some(list) if respond && list.len() != 1 => {
                ctx.error(
                    n.pos,
                    format!(
                        "route `{name_text}` has `respond: true`, so `to` must name exactly one target \
                         (the one whose answer is relayed), not {}; send copies elsewhere with another route",
                        list.len()
                    ),
                );
                valid = false;
                Vec::new()
            }
            Some(list) => list
                .into_iter()
                .map(|(pos, s)| (ctx.origin(pos), Arc::<str>::from(s)))
                .collect(),
            None => {
                valid = false;
                Vec::new()
            }
        },
    };
    Some(RawRoute {
        name: name_text.into(),
        origin,
        sources,
        commands,
        filter,
        transform,
        response_transform,
        respond,
        to,
        valid,
    })
}

// ---- second pass: across files ---------------------------------------------------------------

type Resolved = (Vec<Arc<Source>>, Vec<Arc<Target>>, Vec<Route>);

/// An entry of a `name: {…}` mapping: where it stands, its name, and its value if it is valid.
type Named<T> = (Origin, String, Option<T>);

/// Keeps the first definition of each name; a later one is an error naming the first place.
/// Entries that failed their own checks still take their name, so a duplicate of an invalid
/// entry is reported in the same pass, and references to it are not reported as unknown.
fn unique<T>(
    kind: &str,
    entries: Vec<Named<T>>,
    errors: &mut Vec<LoadError>,
) -> (HashMap<String, Origin>, Vec<(Origin, T)>) {
    let mut names: HashMap<String, Origin> = HashMap::new();
    let mut valid = Vec::new();
    for (origin, name, entry) in entries {
        if let Some(first) = names.get(&name) {
            push(
                errors,
                &origin,
                format!("duplicate {kind} name `{name}` (first defined at {first})"),
            );
            continue;
        }
        names.insert(name, origin.clone());
        if let Some(entry) = entry {
            valid.push((origin, entry));
        }
    }
    (names, valid)
}

fn push(errors: &mut Vec<LoadError>, at: &Origin, message: String) {
    errors.push(LoadError {
        file: at.file.to_string(),
        line: at.line,
        col: at.col,
        message,
    });
}

fn resolve(
    dir: &Path,
    engine: &ScriptEngine,
    raw: RawRules,
    errors: &mut Vec<LoadError>,
) -> Resolved {
    let (source_names, sources) = unique("source", raw.sources, errors);
    let mut paths: HashMap<String, (Arc<str>, Origin)> = HashMap::new();
    let sources = sources
        .into_iter()
        .filter_map(|(origin, source)| {
            if let Some((other, first)) = paths.get(&source.path) {
                push(
                    errors,
                    &origin,
                    format!(
                        "path `{}` is already used by source `{other}` at {first}",
                        source.path
                    ),
                );
                return None;
            }
            paths.insert(source.path.clone(), (source.name.clone(), origin));
            Some(Arc::new(source))
        })
        .collect();
    let (target_names, targets) = unique("target", raw.targets, errors);
    let targets = targets.into_iter().map(|(_, t)| Arc::new(t)).collect();

    let mut route_names: HashMap<Arc<str>, Origin> = HashMap::new();
    let mut routes = Vec::new();
    for raw_route in raw.routes {
        let mut valid = raw_route.valid;
        if let Some(first) = route_names.get(&raw_route.name) {
            push(
                errors,
                &raw_route.origin,
                format!(
                    "duplicate route name `{}` (first defined at {first})",
                    raw_route.name
                ),
            );
            valid = false;
        } else {
            route_names.insert(raw_route.name.clone(), raw_route.origin.clone());
        }
        for (at, s) in raw_route.sources.iter().flatten() {
            if !source_names.contains_key(&**s) {
                push(
                    errors,
                    at,
                    format!("route `{}` names unknown source `{s}`", raw_route.name),
                );
                valid = false;
            }
        }
        for (at, t) in &raw_route.to {
            if !target_names.contains_key(&**t) {
                push(
                    errors,
                    at,
                    format!(
                        "route `{}` delivers to unknown target `{t}`",
                        raw_route.name
                    ),
                );
                valid = false;
            }
        }
        let filter = compile(dir, engine, raw_route.filter, Stage::Filter, errors);
        let transform = compile(dir, engine, raw_route.transform, Stage::Transform, errors);
        let response_transform = compile(
            dir,
            engine,
            raw_route.response_transform,
            Stage::Response,
            errors,
        );
        if !valid {
            continue;
        }
        let (Ok(filter), Ok(transform), Ok(response_transform)) =
            (filter, transform, response_transform)
        else {
            continue;
        };
        routes.push(Route {
            name: raw_route.name,
            sources: raw_route
                .sources
                .map(|list| list.into_iter().map(|(_, s)| s).collect()),
            commands: raw_route.commands,
            filter,
            transform,
            to: raw_route.to.into_iter().map(|(_, t)| t).collect(),
            respond: raw_route.respond,
            response_transform,
            origin: raw_route.origin,
        });
    }
    (sources, targets, routes)
}

fn compile(
    dir: &Path,
    engine: &ScriptEngine,
    text: Option<ScriptText>,
    stage: Stage,
    errors: &mut Vec<LoadError>,
) -> Result<Option<Script>, ()> {
    let (source, origin) = match text {
        None => return Ok(None),
        Some(ScriptText::Inline(source, origin)) => (source, origin),
        Some(ScriptText::File(path, at)) => {
            let relative = Path::new(&path);
            if relative.is_absolute()
                || relative
                    .components()
                    .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
            {
                push(errors, &at, format!("script path `{path}` must be relative to the rules directory and stay inside it"));
                return Err(());
            }
            let full = dir.join(relative);
            match read_text(&full) {
                Ok(source) => {
                    let origin = ScriptOrigin {
                        file: full.display().to_string().into(),
                        first_line: 1,
                        first_col: 1,
                    };
                    (source, origin)
                }
                Err(m) => {
                    push(errors, &at, format!("script `{}`: {m}", full.display()));
                    return Err(());
                }
            }
        }
    };
    engine
        .compile(&source, origin, stage)
        .map(Some)
        .map_err(|e| {
            errors.push(LoadError {
                file: e.file.to_string(),
                line: e.line,
                col: e.col,
                message: format!("script error: {}", e.message),
            });
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::script::Limits;

    fn load_files(files: &[(&str, &str)]) -> Result<RuleSet, LoadErrors> {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let engine = ScriptEngine::new(dir.path(), &Limits::default());
        let env = |name: &str| match name {
            "TOKEN" => Some("tok".to_string()),
            _ => None,
        };
        let result = load_with_env(dir.path(), &engine, &env);
        // Errors name files by full path; make them stable for assertions.
        result.map_err(|mut e| {
            let prefix = format!("{}/", dir.path().display());
            for err in &mut e.0 {
                err.file = err.file.replace(&prefix, "");
            }
            e
        })
    }

    const GOOD: &str = r#"
sources:
  tencent-im:
    path: /im/tencent
    dialect: tencent
    app_ids: [1400000000, "1400000001"]
    token: ${TOKEN}
  billing:
    path: /hooks/billing
    dialect: generic
    command: body.event.type
targets:
  profile:
    url: http://127.0.0.1:7001/im/{command}
    headers: { Authorization: "Bearer ${TOKEN}" }
    timeout: 2s
    retry: { max_attempts: 3, backoff: 100ms, max_backoff: 1s }
    signing_secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
routes:
  - name: nick
    sources: [tencent-im]
    commands: ["Profile.*"]
    filter: 'body.x == 1'
    to: [profile]
"#;

    #[test]
    fn loads_a_good_rule_set() {
        let rules = load_files(&[("a.yaml", GOOD)]).unwrap();
        let s = rules.source("tencent-im").unwrap();
        assert_eq!(s.app_ids, ["1400000000", "1400000001"]);
        assert_eq!(s.token.as_deref(), Some("tok"));
        assert_eq!(s.max_clock_skew, Duration::from_secs(60));
        assert_eq!(s.max_body, 1 << 20);
        assert_eq!(
            rules.source("billing").unwrap().command,
            CommandLocation::Body(vec!["event".into(), "type".into()])
        );
        let t = rules.target("profile").unwrap();
        assert_eq!(t.headers["authorization"], "Bearer tok");
        assert_eq!(t.retry.max_attempts, 3);
        assert_eq!(t.concurrency, 32);
        assert!(t.signing_key.is_some());
        assert_eq!(rules.routes.len(), 1);
        assert!(rules.routes[0].filter.is_some());
    }

    #[test]
    fn reports_every_error_with_its_position() {
        let bad = r#"sources:
  tencent-im:
    pathh: /im/tencent
    dialect: tencnet
  openim:
    path: im/openim
    dialect: openim
    app_ids: [1]
targets:
  t:
    url: http://h/{nope}
    timeout: 5
    concurrency: 0
    signing_secret: plain
routes:
  - name: r
    sources: [nosuch]
    filter: 'body.x =='
    to: [missing]
"#;
        let errs = load_files(&[("a.yaml", bad)]).unwrap_err();
        let text = errs.to_string();
        let expect = [
            "a.yaml:3:5: unknown key `pathh` in source `tencent-im`; did you mean `path`?",
            "a.yaml:4:14: unknown dialect `tencnet`",
            "a.yaml:2:3: source `tencent-im` needs a `path`",
            "a.yaml:6:11: path `im/openim` must start with '/'",
            "a.yaml:8:14: `app_ids` applies only to tencent sources",
            "a.yaml:11:10: unknown placeholder `{nope}`",
            "a.yaml:12:14: timeout needs a unit",
            "a.yaml:13:18: concurrency must be a whole number from 1 to 10000",
            "a.yaml:14:21: signing_secret must be `whsec_`",
            "a.yaml:17:15: route `r` names unknown source `nosuch`",
            "a.yaml:19:10: route `r` delivers to unknown target `missing`",
            "a.yaml:18:",
        ];
        for e in expect {
            assert!(text.contains(e), "missing {e:?} in:\n{text}");
        }
    }

    #[test]
    fn duplicates_across_files_name_both_places() {
        let a = "targets:\n  t:\n    url: http://h/a\n";
        let b = "targets:\n  t:\n    url: http://h/b\nroutes:\n  - {name: r, to: [t]}\n  - {name: r, to: [t]}\n";
        let text = load_files(&[("a.yaml", a), ("b.yml", b)])
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("b.yml:2:3: duplicate target name `t` (first defined at"),
            "{text}"
        );
        assert!(text.contains("a.yaml:2:3"), "{text}");
        assert!(text.contains("b.yml:6:"), "{text}");
    }

    #[test]
    fn editing_an_imported_module_changes_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write(
            "a.yaml",
            "targets:\n  t: {url: \"http://h/a\"}\nroutes:\n  - name: r\n    filter: 'import \"lib/m\" as m; m::ok()'\n    to: [t]\n",
        );
        write("lib/m.rhai", "fn ok() { true }");
        let engine = ScriptEngine::new(dir.path(), &Limits::default());
        let first = load(dir.path(), &engine).unwrap().fingerprint;
        assert_eq!(load(dir.path(), &engine).unwrap().fingerprint, first);
        write("lib/m.rhai", "fn ok() { false }");
        assert_ne!(load(dir.path(), &engine).unwrap().fingerprint, first);
    }

    #[test]
    fn empty_selectors_are_errors() {
        let y = "targets:\n  t: {url: \"http://h/a\"}\nroutes:\n  - {name: r, sources: [], commands: [], to: [t]}\n";
        let text = load_files(&[("a.yaml", y)]).unwrap_err().to_string();
        assert!(text.contains("a.yaml:4:24: `sources` is empty"), "{text}");
        assert!(text.contains("`commands` is empty"), "{text}");
    }

    #[test]
    fn an_invalid_entry_still_takes_its_name() {
        let a = "targets:\n  t:\n    url: not-a-url\nroutes:\n  - {name: r, to: [t]}\n";
        let b = "targets:\n  t:\n    url: http://h/b\n";
        let text = load_files(&[("a.yaml", a), ("b.yaml", b)])
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("a.yaml:3:10: `not-a-url` is not a URL"),
            "{text}"
        );
        assert!(
            text.contains("b.yaml:2:3: duplicate target name `t`"),
            "{text}"
        );
        assert!(!text.contains("unknown target"), "{text}");
        assert_eq!(text.lines().count(), 2, "{text}");
    }

    #[test]
    fn unset_env_is_an_error_and_defaults_apply() {
        let y = "targets:\n  t:\n    url: http://h/a\n    headers: {A: \"${UNSET}\", B: \"${UNSET:-d}\"}\n";
        let text = load_files(&[("a.yaml", y)]).unwrap_err().to_string();
        assert!(
            text.contains("a.yaml:4:18: header value: environment variable UNSET is not set"),
            "{text}"
        );
        let y = "targets:\n  t:\n    url: http://h/a\n    headers: {B: \"${UNSET:-d}\"}\n";
        let rules = load_files(&[("a.yaml", y)]).unwrap();
        assert_eq!(rules.target("t").unwrap().headers["b"], "d");
    }

    #[test]
    fn scripts_from_files_and_their_errors() {
        let y = "targets:\n  t: {url: \"http://h/a\"}\nroutes:\n  - name: r\n    transform_file: scripts/t.rhai\n    to: [t]\n  - name: r2\n    filter_file: ../x.rhai\n    to: [t]\n";
        let ok = load_files(&[
            ("a.yaml", y.split("  - name: r2").next().unwrap()),
            ("scripts/t.rhai", "#{a: body}"),
        ])
        .unwrap();
        assert!(ok.routes[0].transform.is_some());
        let text = load_files(&[("a.yaml", y), ("scripts/t.rhai", "let x = ;\n")])
            .unwrap_err()
            .to_string();
        assert!(text.contains("scripts/t.rhai:1:"), "{text}");
        assert!(
            text.contains("a.yaml:8:18: script path `../x.rhai` must be relative"),
            "{text}"
        );
    }

    #[test]
    fn inline_block_script_lines_map_to_the_file() {
        let y = "targets:\n  t: {url: \"http://h/a\"}\nroutes:\n  - name: r\n    transform: |\n      let a = 1;\n      let b = ;\n    to: [t]\n";
        let text = load_files(&[("a.yaml", y)]).unwrap_err().to_string();
        assert!(text.contains("a.yaml:7:"), "{text}");
    }

    #[test]
    fn empty_or_missing_directory() {
        let text = load_files(&[("notes.txt", "x")]).unwrap_err().to_string();
        assert!(text.contains("no rule files"), "{text}");
        let engine = ScriptEngine::new(Path::new("."), &Limits::default());
        let err = load(Path::new("/nonexistent/rules"), &engine).unwrap_err();
        assert!(err.to_string().contains("cannot read the rules directory"));
    }

    #[test]
    fn yaml_syntax_error_is_located() {
        let text = load_files(&[("a.yaml", "routes:\n  - name: [x\n")])
            .unwrap_err()
            .to_string();
        assert!(text.starts_with("a.yaml:"), "{text}");
    }

    #[test]
    fn openim_suffix_lookup() {
        let y = "sources:\n  o: {path: /im/openim, dialect: openim}\n  g: {path: /g, dialect: generic}\n";
        let rules = load_files(&[("a.yaml", y)]).unwrap();
        let (s, suffix) = rules
            .source_for_path("/im/openim/callbackAfterUpdateUserInfoCommand")
            .unwrap();
        assert_eq!(&*s.name, "o");
        assert_eq!(suffix, "callbackAfterUpdateUserInfoCommand");
        assert_eq!(rules.source_for_path("/im/openim").unwrap().1, "");
        assert!(rules.source_for_path("/g/x").is_none());
        assert!(rules.source_for_path("/nope").is_none());
    }
}
