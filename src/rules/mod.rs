//! The rule set: sources, targets and routes, as loaded and validated from the rules directory.
//!
//! A `RuleSet` is immutable. A reload builds a new one beside the running one and swaps it in
//! whole (see `reload.rs`), so a callback is always routed by exactly one generation.

pub mod glob;
pub mod load;
pub mod text;
pub mod url;
pub mod yaml;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::dialect::DialectKind;
use crate::script::{Reads, Script};

pub use glob::Glob;
pub use load::{load, LoadError, LoadErrors};
pub use url::UrlTemplate;

/// Where something was defined, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: Arc<str>,
    pub line: u32,
    pub col: u32,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

/// Where the generic dialect finds the command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandLocation {
    /// No command configured: every callback has command `""`.
    None,
    /// A dotted path into the JSON body.
    Body(Vec<String>),
    /// A request header (lower-case name).
    Header(String),
    /// A query parameter.
    Query(String),
}

/// An ingress endpoint.
#[derive(Debug)]
pub struct Source {
    pub name: Arc<str>,
    pub path: String,
    pub dialect: DialectKind,
    /// tencent: the accepted `SdkAppid` values.
    pub app_ids: Vec<String>,
    /// tencent: when set, `Sign` and `RequestTime` are required.
    pub token: Option<String>,
    pub max_clock_skew: Duration,
    pub max_body: usize,
    /// generic: where the command is.
    pub command: CommandLocation,
    /// How long a synchronous (`respond: true`) route may take to answer.
    pub respond_timeout: Duration,
    /// What the IM server is told when a synchronous route cannot answer.
    pub on_respond_failure: OnRespondFailure,
    pub origin: Origin,
}

/// The answer given in place of a synchronous target's when it cannot answer in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnRespondFailure {
    /// The dialect's OK: the IM server lets the action happen.
    Allow,
    /// The dialect's "no": Tencent `ErrorCode` 1, OpenIM `nextCode` 1.
    Deny,
}

impl OnRespondFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnRespondFailure::Allow => "allow",
            OnRespondFailure::Deny => "deny",
        }
    }
}

/// Retry policy of a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first included.
    pub max_attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 12,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(600),
        }
    }
}

/// An internal HTTP service deliveries go to.
#[derive(Debug)]
pub struct Target {
    pub name: Arc<str>,
    pub url: UrlTemplate,
    pub method: http::Method,
    pub headers: http::HeaderMap,
    pub timeout: Duration,
    pub concurrency: usize,
    pub retry: RetryPolicy,
    /// The decoded key of a `whsec_…` signing secret.
    pub signing_key: Option<Vec<u8>>,
    pub origin: Origin,
}

/// A rule: which callbacks, optionally filtered and reshaped, go to which targets.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    /// `None` = every source.
    pub sources: Option<Vec<Arc<str>>>,
    /// `None` = every command.
    pub commands: Option<Vec<Glob>>,
    pub filter: Option<Script>,
    pub transform: Option<Script>,
    pub to: Vec<Arc<str>>,
    /// Synchronous: the callback goes to the one target in `to` at once and its answer is
    /// relayed to the IM server (through `response_transform` when there is one).
    pub respond: bool,
    pub response_transform: Option<Script>,
    pub origin: Origin,
}

impl Route {
    /// What the route's scripts read, `response_transform` included.
    pub fn reads(&self) -> Reads {
        [&self.filter, &self.transform, &self.response_transform]
            .into_iter()
            .flatten()
            .fold(Reads::NONE, |reads, script| reads | script.reads)
    }

    /// Whether the route applies to this source and command (before its filter).
    pub fn selects_source(&self, source: &str) -> bool {
        self.sources
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| &**n == source))
    }

    pub fn selects_command(&self, command: &str) -> bool {
        self.commands
            .as_ref()
            .is_none_or(|globs| globs.iter().any(|g| g.matches(command)))
    }
}

/// A whole, validated rule set.
#[derive(Debug)]
pub struct RuleSet {
    pub dir: PathBuf,
    /// The YAML files read, in load order.
    pub files: Vec<PathBuf>,
    pub sources: Vec<Arc<Source>>,
    pub targets: Vec<Arc<Target>>,
    /// In evaluation order: file-name order, then file order.
    pub routes: Vec<Route>,
    by_path: HashMap<String, usize>,
    by_target: HashMap<Arc<str>, usize>,
    /// Increases by one with each successful load of a running server.
    pub generation: u64,
    pub loaded_at: SystemTime,
    /// Hash of every file read, to tell a real change from a touch.
    pub fingerprint: u64,
    /// What the scripts of all routes read: the values built for scripts per callback.
    pub reads: Reads,
}

impl RuleSet {
    pub(crate) fn new(
        dir: PathBuf,
        files: Vec<PathBuf>,
        sources: Vec<Arc<Source>>,
        targets: Vec<Arc<Target>>,
        routes: Vec<Route>,
        fingerprint: u64,
    ) -> RuleSet {
        let by_path = sources
            .iter()
            .enumerate()
            .map(|(i, s)| (s.path.clone(), i))
            .collect();
        let by_target = targets
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let reads = routes
            .iter()
            .fold(Reads::NONE, |reads, r| reads | r.reads());
        RuleSet {
            dir,
            files,
            sources,
            targets,
            routes,
            by_path,
            by_target,
            generation: 1,
            loaded_at: SystemTime::now(),
            fingerprint,
            reads,
        }
    }

    /// The source serving a request path, and the path suffix after the source's path.
    /// Only openim sources accept a suffix (`{path}/{command}`).
    pub fn source_for_path<'a>(&self, path: &'a str) -> Option<(&Arc<Source>, &'a str)> {
        if let Some(&i) = self.by_path.get(path) {
            return Some((&self.sources[i], ""));
        }
        let (prefix, suffix) = path.rsplit_once('/')?;
        let &i = self.by_path.get(prefix)?;
        let source = &self.sources[i];
        (source.dialect == DialectKind::OpenIm && !suffix.is_empty()).then_some((source, suffix))
    }

    pub fn source(&self, name: &str) -> Option<&Arc<Source>> {
        self.sources.iter().find(|s| &*s.name == name)
    }

    pub fn target(&self, name: &str) -> Option<&Arc<Target>> {
        self.by_target.get(name).map(|&i| &self.targets[i])
    }
}

impl RuleSet {
    /// One line per source, target and route, as `switchyard check` prints them.
    pub fn summary(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for s in &self.sources {
            let mut line = format!(
                "source {}: POST {} ({})",
                s.name,
                s.path,
                s.dialect.as_str()
            );
            match s.dialect {
                DialectKind::Tencent => {
                    line.push_str(&format!(", app_ids {}", s.app_ids.join(",")));
                    line.push_str(if s.token.is_some() {
                        ", Sign required"
                    } else {
                        ", no Sign check (no token)"
                    });
                }
                DialectKind::OpenIm => line.push_str(&format!(", also {}/{{command}}", s.path)),
                DialectKind::Generic => match &s.command {
                    CommandLocation::None => line.push_str(", no command"),
                    CommandLocation::Body(p) => {
                        line.push_str(&format!(", command body.{}", p.join(".")))
                    }
                    CommandLocation::Header(h) => line.push_str(&format!(", command header.{h}")),
                    CommandLocation::Query(q) => line.push_str(&format!(", command query.{q}")),
                },
            }
            if self
                .routes
                .iter()
                .any(|r| r.respond && r.selects_source(&s.name))
            {
                line.push_str(&format!(
                    ", synchronous answers within {:?} (on failure: {})",
                    s.respond_timeout,
                    s.on_respond_failure.as_str()
                ));
            }
            lines.push(line);
        }
        for t in &self.targets {
            lines.push(format!(
                "target {}: {} {} (timeout {:?}, concurrency {}, {} attempts{})",
                t.name,
                t.method,
                t.url.as_str(),
                t.timeout,
                t.concurrency,
                t.retry.max_attempts,
                if t.signing_key.is_some() {
                    ", signed"
                } else {
                    ""
                }
            ));
        }
        for r in &self.routes {
            let sources = r
                .sources
                .as_ref()
                .map(|s| s.iter().map(|n| &**n).collect::<Vec<_>>().join(","))
                .unwrap_or_else(|| "*".into());
            let commands = r
                .commands
                .as_ref()
                .map(|c| c.iter().map(Glob::as_str).collect::<Vec<_>>().join(","))
                .unwrap_or_else(|| "*".into());
            let script = |s: &Option<Script>, what: &str| {
                s.as_ref()
                    .map(|s| format!(", {what} {}:{}", s.origin.file, s.origin.first_line))
                    .unwrap_or_default()
            };
            lines.push(format!(
                "route {}: sources {sources}, commands {commands}{}{}{} -> {}{}",
                r.name,
                script(&r.filter, "filter"),
                script(&r.transform, "transform"),
                script(&r.response_transform, "response_transform"),
                r.to.iter().map(|t| &**t).collect::<Vec<_>>().join(", "),
                if r.respond { " (responds)" } else { "" }
            ));
        }
        lines
    }
}
