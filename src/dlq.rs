//! `switchyard dlq`: dead letters through a running server's admin API.
//!
//! A client of the admin API (reqwest on a current-thread runtime) and its renderings: an
//! aligned table for `list`, `key: value` lines for `show`, one summary line for `replay` and
//! `drop`, or the API's JSON with `--json`. It knows the server only through that API: it never
//! opens the spool itself (the server holds it exclusively).

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};

/// Global options and the subcommand of `switchyard dlq`.
#[derive(Debug, clap::Args)]
pub struct DlqArgs {
    /// Admin API of the running server
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "SWITCHYARD_ADMIN",
        default_value = "http://127.0.0.1:9090"
    )]
    pub admin: String,
    /// Print the admin API's JSON answer instead of a table or summary
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first
    List {
        /// Only dead letters of this target
        #[arg(long)]
        target: Option<String>,
        /// Only dead letters of this route
        #[arg(long)]
        route: Option<String>,
        /// Most dead letters to list (1 to 1000)
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only dead letters after this id (the `--after` printed below a full page)
        #[arg(long, value_name = "ID")]
        after: Option<String>,
    },
    /// Show everything stored of one dead letter
    Show {
        /// The dead letter's id
        id: String,
    },
    /// Replay dead letters, by id or by --target / --route / --all
    ///
    /// A failed delivery goes back to its target's queue with the same webhook-id; a callback a
    /// route's script failed on goes through that route of the current rules.
    Replay(Which),
    /// Drop dead letters for good
    Drop(Which),
}

/// Which dead letters `replay` and `drop` act on: ids, or a selector.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = true)]
pub struct Which {
    /// Dead letter ids
    #[arg(value_name = "ID", conflicts_with_all = ["all", "target", "route"])]
    pub ids: Vec<String>,
    /// Every dead letter
    #[arg(long)]
    pub all: bool,
    /// Every dead letter of this target
    #[arg(long)]
    pub target: Option<String>,
    /// Every dead letter of this route
    #[arg(long)]
    pub route: Option<String>,
}

impl Which {
    /// The request body of the admin API.
    fn body(&self) -> Value {
        if !self.ids.is_empty() {
            return json!({ "ids": self.ids });
        }
        let mut body = serde_json::Map::new();
        if let Some(t) = &self.target {
            body.insert("target".into(), t.as_str().into());
        }
        if let Some(r) = &self.route {
            body.insert("route".into(), r.as_str().into());
        }
        // Nothing selected stays nothing: the server refuses it rather than guessing.
        if self.all {
            body.insert("all".into(), true.into());
        }
        Value::Object(body)
    }
}

/// Why a `dlq` command failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("cannot reach the admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the admin API answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("unexpected answer from the admin API: {0}")]
    Invalid(String),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// How long a request may take: reads are quick; a replay or drop of many dead letters is not.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Runs a `dlq` command, printing its output. `Ok(false)`: it ran, but not everything asked for
/// was done (a dead letter kept or not found); the exit status should say so.
pub fn run(args: &DlqArgs) -> Result<bool, DlqError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DlqError::Runtime)?;
    let client = Client::new(&args.admin)?;
    runtime.block_on(async {
        let (answer, all_done) = match &args.command {
            DlqCommand::List {
                target,
                route,
                limit,
                after,
            } => {
                let mut query = form_urlencoded::Serializer::new(String::new());
                query.append_pair("limit", &limit.to_string());
                for (name, value) in [("target", target), ("route", route), ("after", after)] {
                    if let Some(v) = value {
                        query.append_pair(name, v);
                    }
                }
                let answer = client
                    .get(&format!("/admin/dead-letters?{}", query.finish()))
                    .await?;
                (answer, true)
            }
            DlqCommand::Show { id } => {
                let answer = client
                    .get(&format!("/admin/dead-letters/{}", segment(id)))
                    .await?;
                (answer, true)
            }
            DlqCommand::Replay(which) => {
                let answer = client
                    .post("/admin/dead-letters/replay", &which.body())
                    .await?;
                let done = ["kept", "not_found", "errors"]
                    .iter()
                    .all(|k| answer[k].as_u64().unwrap_or(0) == 0);
                (answer, done)
            }
            DlqCommand::Drop(which) => {
                let answer = client
                    .post("/admin/dead-letters/drop", &which.body())
                    .await?;
                let done = answer["not_found"].as_u64().unwrap_or(0) == 0;
                (answer, done)
            }
        };
        let text = if args.json {
            serde_json::to_string_pretty(&answer).unwrap_or_default() + "\n"
        } else {
            match &args.command {
                DlqCommand::List { .. } => render_list(&answer)?,
                DlqCommand::Show { .. } => render_show(&answer)?,
                DlqCommand::Replay(_) => render_replay(&answer)?,
                DlqCommand::Drop(_) => render_drop(&answer)?,
            }
        };
        print!("{text}");
        Ok(all_done)
    })
}

/// A path segment, percent-encoded.
fn segment(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    fn new(admin: &str) -> Result<Client, DlqError> {
        let admin = admin.trim().trim_end_matches('/');
        let base = if admin.contains("://") {
            admin.to_string()
        } else {
            format!("http://{admin}")
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // The admin API is private: never send it through a proxy from the environment.
            .no_proxy()
            .build()
            .map_err(|e| DlqError::Client(e.to_string()))?;
        Ok(Client { base, http })
    }

    async fn get(&self, path: &str) -> Result<Value, DlqError> {
        self.send(self.http.get(self.url(path)).timeout(READ_TIMEOUT))
            .await
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value, DlqError> {
        let req = self
            .http
            .post(self.url(path))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .timeout(CHANGE_TIMEOUT);
        self.send(req).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, DlqError> {
        let unreachable = |e: reqwest::Error| DlqError::Unreachable {
            url: self.base.clone(),
            reason: describe(&e),
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let text = resp.text().await.map_err(unreachable)?;
        let value: Option<Value> = serde_json::from_str(&text).ok();
        if !status.is_success() {
            let message = value
                .as_ref()
                .and_then(|v| v["error"].as_str())
                .map(str::to_string)
                .unwrap_or_else(|| text.chars().take(300).collect());
            return Err(DlqError::Api {
                status: status.as_u16(),
                message,
            });
        }
        value.ok_or_else(|| {
            DlqError::Invalid(format!(
                "not JSON: {}",
                text.chars().take(300).collect::<String>()
            ))
        })
    }
}

/// A reqwest error with its causes, without the URL it repeats.
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "no answer in time".into();
    }
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    // The innermost cause is the one that says what happened (e.g. connection refused).
    causes.pop().unwrap_or_else(|| e.to_string())
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

/// A cell: `-` for nothing, one line.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.split_whitespace().collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    }
}

fn render_list(answer: &Value) -> Result<String, DlqError> {
    let items = answer["items"]
        .as_array()
        .ok_or_else(|| DlqError::Invalid("no `items` in the list".into()))?;
    let mut out = String::new();
    if items.is_empty() {
        out.push_str("no dead letters\n");
        return Ok(out);
    }
    const COLUMNS: [(&str, &str); 8] = [
        ("ID", "id"),
        ("FAILED AT", "failed_at"),
        ("COMMAND", "command"),
        ("ROUTE", "route"),
        ("TARGET", "target"),
        ("ATTEMPTS", "attempts"),
        ("STATUS", "last_status"),
        ("REASON", "reason"),
    ];
    let rows: Vec<Vec<String>> = std::iter::once(COLUMNS.map(|(h, _)| h.to_string()).to_vec())
        .chain(
            items
                .iter()
                .map(|item| COLUMNS.map(|(_, key)| cell(&item[key])).to_vec()),
        )
        .collect();
    let widths: Vec<usize> = (0..COLUMNS.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let mut line = String::new();
        for (c, value) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(value);
            } else {
                let _ = write!(line, "{value:<width$}  ", width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if let Some(next) = answer["next"].as_str() {
        let _ = writeln!(out, "more: add --after {next}");
    }
    Ok(out)
}

/// A `key: value` line, values aligned; `-` for nothing; a value of several lines goes below its
/// key, indented.
fn field(out: &mut String, indent: &str, key: &str, value: &str) {
    if value.contains('\n') {
        let _ = writeln!(out, "{indent}{key}:");
        for line in value.lines() {
            let _ = writeln!(out, "{indent}  {line}");
        }
    } else {
        let value = if value.is_empty() { "-" } else { value };
        let _ = writeln!(out, "{indent}{:<14}{value}", format!("{key}:"));
    }
}

fn render_show(letter: &Value) -> Result<String, DlqError> {
    if !letter.is_object() {
        return Err(DlqError::Invalid("the dead letter is not an object".into()));
    }
    let mut out = String::new();
    for key in [
        "id",
        "event_id",
        "source",
        "command",
        "route",
        "target",
        "reason",
        "attempts",
        "last_status",
        "created_at",
        "failed_at",
        "content_type",
    ] {
        let value = match &letter[key] {
            Value::String(s) => s.clone(),
            Value::Null => "-".into(),
            other => other.to_string(),
        };
        field(&mut out, "", key, &value);
    }
    field(&mut out, "", "last_answer", text(letter, "last_answer"));
    if let Some(callback) = letter["callback"].as_object() {
        out.push_str("callback:\n");
        for key in ["app_id", "received_at"] {
            let value = callback.get(key).and_then(Value::as_str).unwrap_or("");
            field(&mut out, "  ", key, value);
        }
        for key in ["query", "headers"] {
            let _ = writeln!(out, "  {key}:");
            if let Some(pairs) = callback.get(key).and_then(Value::as_object) {
                for (name, value) in pairs {
                    let _ = writeln!(out, "    {name}: {}", value.as_str().unwrap_or(""));
                }
            }
        }
    }
    let body = match &letter["body"] {
        Value::String(s) => s.clone(),
        other => serde_json::to_string_pretty(other).unwrap_or_default(),
    };
    out.push_str("body:\n");
    for line in body.lines() {
        let _ = writeln!(out, "  {line}");
    }
    Ok(out)
}

fn count(answer: &Value, key: &str) -> u64 {
    answer[key].as_u64().unwrap_or(0)
}

fn render_replay(answer: &Value) -> Result<String, DlqError> {
    let results = answer["results"]
        .as_array()
        .ok_or_else(|| DlqError::Invalid("no `results` in the replay answer".into()))?;
    let mut out = format!(
        "replayed {} dead letters: {} queued, {} skipped, {} kept, {} not found",
        results.len(),
        count(answer, "queued"),
        count(answer, "skipped"),
        count(answer, "kept"),
        count(answer, "not_found"),
    );
    if count(answer, "errors") > 0 {
        let _ = write!(out, ", {} errors", count(answer, "errors"));
    }
    out.push('\n');
    for r in results {
        let id = text(r, "id");
        match text(r, "outcome") {
            "queued" => {}
            "not_found" => {
                let _ = writeln!(out, "  not found  {id}");
            }
            "error" => {
                let _ = writeln!(out, "  error      {id}: {}", text(r, "error"));
            }
            outcome => {
                let _ = writeln!(out, "  {outcome:<9}  {id}: {}", text(r, "reason"));
            }
        }
    }
    Ok(out)
}

fn render_drop(answer: &Value) -> Result<String, DlqError> {
    let dropped = answer["dropped"]
        .as_u64()
        .ok_or_else(|| DlqError::Invalid("no `dropped` in the drop answer".into()))?;
    let mut out = format!("dropped {dropped} dead letters");
    if count(answer, "not_found") > 0 {
        let _ = write!(out, ", {} not found", count(answer, "not_found"));
    }
    out.push('\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_aligned_and_says_how_to_go_on() {
        let answer = json!({
            "items": [
                {"id": "a1", "failed_at": "2026-01-01T00:00:00.000Z", "command": "Group.X",
                 "route": "r", "target": "long-target", "attempts": 3, "last_status": 400,
                 "reason": "HTTP 400\nBad Request"},
                {"id": "b22", "failed_at": "2026-01-01T00:00:01.000Z", "command": "",
                 "route": "route-two", "target": null, "attempts": 0, "last_status": null,
                 "reason": "transform failed"},
            ],
            "next": "b22",
        });
        let table = render_list(&answer).unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        let reason_at = lines[0].find("REASON").unwrap();
        assert_eq!(&lines[1][reason_at..], "HTTP 400 Bad Request");
        assert_eq!(&lines[2][reason_at..], "transform failed");
        let target_at = lines[0].find("TARGET").unwrap();
        assert!(lines[2][target_at..].starts_with("-  "), "{table}");
        assert_eq!(lines[3], "more: add --after b22");
        assert_eq!(
            render_list(&json!({"items": [], "next": null})).unwrap(),
            "no dead letters\n"
        );
    }

    #[test]
    fn selections_become_request_bodies() {
        let which = |ids: &[&str], all: bool, target: Option<&str>, route: Option<&str>| Which {
            ids: ids.iter().map(|s| s.to_string()).collect(),
            all,
            target: target.map(str::to_string),
            route: route.map(str::to_string),
        };
        assert_eq!(
            which(&["a", "b"], false, None, None).body(),
            json!({"ids": ["a", "b"]})
        );
        assert_eq!(which(&[], true, None, None).body(), json!({"all": true}));
        assert_eq!(
            which(&[], false, Some("t"), Some("r")).body(),
            json!({"target": "t", "route": "r"})
        );
    }

    #[test]
    fn admin_addresses_without_a_scheme_are_http() {
        let base = |admin: &str| Client::new(admin).unwrap().base;
        assert_eq!(base("127.0.0.1:9090/"), "http://127.0.0.1:9090");
        assert_eq!(base("https://admin.internal"), "https://admin.internal");
    }
}
