//! The dead-letter endpoints of the admin API: list (filtered, paged), show, replay, drop.
//!
//! Replay and drop act on ids, or on every dead letter a selector (`target`, `route`, `all`)
//! matches; selectors page through the spool, never loading every dead letter at once. What a
//! replay does with one dead letter is `delivery::replay`'s business, not this module's.

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::{json, Map, Value};
use tokio::task::JoinSet;

use super::{ok_json, rfc3339_ms, Admin, Answer, ApiError};
use crate::delivery::replay::{replay, Replayed};
use crate::rules::RuleSet;
use crate::server::HttpResponse;
use crate::spool::{DeadLetter, DeadQuery, Spool, SpoolError};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Most ids one replay or drop request may name.
const MAX_IDS: usize = 1000;
/// Dead letters read (and replayed concurrently, so their commits are shared) per step of a
/// replay or drop by selector.
const PAGE: usize = 200;

/// Which dead letters a replay or drop acts on: `{"ids": [...]}`, or any of `target`, `route`,
/// `all: true`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Selection {
    ids: Option<Vec<String>>,
    target: Option<String>,
    route: Option<String>,
    #[serde(default)]
    all: bool,
}

#[derive(Debug)]
enum Selected {
    Ids(Vec<String>),
    Matching(DeadQuery),
}

impl Selection {
    fn resolve(self) -> Result<Selected, ApiError> {
        let selector = self.target.is_some() || self.route.is_some() || self.all;
        match self.ids {
            Some(_) if selector => Err(ApiError::bad_request(
                "give either `ids` or a selector (`target`, `route`, `all`), not both",
            )),
            Some(ids) if ids.is_empty() => Err(ApiError::bad_request("`ids` is empty")),
            Some(ids) if ids.len() > MAX_IDS => Err(ApiError::bad_request(format!(
                "at most {MAX_IDS} ids per request; use a selector for more"
            ))),
            Some(ids) => {
                let mut unique: Vec<String> = Vec::with_capacity(ids.len());
                for id in ids {
                    if !unique.contains(&id) {
                        unique.push(id);
                    }
                }
                Ok(Selected::Ids(unique))
            }
            None if selector => Ok(Selected::Matching(DeadQuery {
                target: self.target,
                route: self.route,
                after: None,
                limit: PAGE,
            })),
            None => Err(ApiError::bad_request(
                "say which dead letters: `ids`, `target`, `route`, or `all: true`",
            )),
        }
    }
}

/// Pages through the dead letters a query matches that existed when the request began. Ids are
/// UUIDv7 (ordered by time): a dead letter made while the operation runs — a replayed callback
/// whose new delivery fails at once — has a newer id and is not taken again by the same request.
struct Pages<'a> {
    spool: &'a dyn Spool,
    query: DeadQuery,
    until: u128,
    done: bool,
}

impl<'a> Pages<'a> {
    fn new(spool: &'a dyn Spool, query: DeadQuery) -> Pages<'a> {
        Pages {
            spool,
            query,
            until: uuid::Uuid::now_v7().as_u128(),
            done: false,
        }
    }

    /// The ids of the next page; empty when there are no more.
    fn next_ids(&mut self) -> Result<Vec<String>, SpoolError> {
        if self.done {
            return Ok(Vec::new());
        }
        let page = self.spool.list_dead(&self.query)?;
        if page.len() < self.query.limit {
            self.done = true;
        }
        if let Some(last) = page.last() {
            self.query.after = Some(last.id.to_string());
        }
        let mut ids = Vec::with_capacity(page.len());
        for letter in page {
            if id_value(&letter.id) >= self.until {
                self.done = true;
                break;
            }
            ids.push(letter.id.to_string());
        }
        if ids.is_empty() {
            self.done = true;
        }
        Ok(ids)
    }
}

fn id_value(id: &str) -> u128 {
    uuid::Uuid::parse_str(id).map_or(0, |u| u.as_u128())
}

/// Totals and per-id outcomes of a replay.
#[derive(Debug, Default, serde::Serialize)]
struct ReplayReport {
    queued: usize,
    skipped: usize,
    kept: usize,
    not_found: usize,
    /// The spool could not do it (full, storage error); the dead letter stays.
    errors: usize,
    results: Vec<Value>,
}

impl ReplayReport {
    fn add(&mut self, id: String, result: Result<Replayed, SpoolError>) {
        let mut entry = Map::new();
        entry.insert("id".into(), Value::String(id));
        match result {
            Ok(replayed) => {
                match &replayed {
                    Replayed::Queued { .. } => self.queued += 1,
                    Replayed::Skipped { .. } => self.skipped += 1,
                    Replayed::Kept { .. } => self.kept += 1,
                    Replayed::NotFound => self.not_found += 1,
                }
                if let Ok(Value::Object(fields)) = serde_json::to_value(&replayed) {
                    entry.extend(fields);
                }
            }
            Err(e) => {
                self.errors += 1;
                entry.insert("outcome".into(), "error".into());
                entry.insert("error".into(), e.to_string().into());
            }
        }
        self.results.push(Value::Object(entry));
    }
}

impl Admin {
    /// `GET /admin/dead-letters?target=&route=&limit=&after=`
    pub(super) fn list_dead(&self, query: &str) -> Answer {
        let mut query = list_query(query)?;
        let limit = query.limit;
        // One more than asked tells whether there is a next page.
        query.limit = limit + 1;
        let mut items = self.spool.list_dead(&query)?;
        let more = items.len() > limit;
        items.truncate(limit);
        let next = if more {
            items.last().map(|l| l.id.to_string())
        } else {
            None
        };
        ok_json(&json!({
            "items": items.iter().map(|l| Value::Object(summary(l))).collect::<Vec<_>>(),
            "next": next,
        }))
    }

    /// `GET /admin/dead-letters/{id}`
    pub(super) fn show_dead(&self, id: &str) -> Answer {
        match self.spool.get_dead(id)? {
            Some(letter) => ok_json(&detail(&letter)),
            None => Err(no_such(id)),
        }
    }

    /// `DELETE /admin/dead-letters/{id}`
    pub(super) async fn delete_dead(&self, id: &str) -> Answer {
        if self.spool.drop_dead(vec![id.to_string()]).await? == 0 {
            return Err(no_such(id));
        }
        tracing::info!(id, "dead letter dropped");
        let mut resp = HttpResponse::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::NO_CONTENT;
        Ok(resp)
    }

    /// `POST /admin/dead-letters/replay`
    pub(super) async fn replay_dead(&self, selection: Selection) -> Answer {
        // One snapshot of the current rules for the whole request.
        let rules = self.rules.load_full();
        let mut report = ReplayReport::default();
        match selection.resolve()? {
            Selected::Ids(ids) => self.replay_ids(&rules, ids, &mut report).await,
            Selected::Matching(query) => {
                let mut pages = Pages::new(&*self.spool, query);
                loop {
                    let ids = pages.next_ids()?;
                    if ids.is_empty() {
                        break;
                    }
                    let errors = report.errors;
                    self.replay_ids(&rules, ids, &mut report).await;
                    // The spool refuses (full, failing): the rest would fare no better.
                    if report.errors > errors {
                        break;
                    }
                }
            }
        }
        tracing::info!(
            queued = report.queued,
            skipped = report.skipped,
            kept = report.kept,
            not_found = report.not_found,
            errors = report.errors,
            "dead letters replayed"
        );
        ok_json(&report)
    }

    /// Replays `ids` concurrently (their spool commits are shared), recording results in order.
    async fn replay_ids(&self, rules: &Arc<RuleSet>, ids: Vec<String>, report: &mut ReplayReport) {
        let mut tasks = JoinSet::new();
        for (i, id) in ids.iter().enumerate() {
            let (spool, rules, engine) = (self.spool.clone(), rules.clone(), self.engine.clone());
            let id = id.clone();
            tasks.spawn(async move { (i, replay(&*spool, &rules, &engine, &id).await) });
        }
        let mut results: Vec<Option<Result<Replayed, SpoolError>>> =
            ids.iter().map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            if let Ok((i, result)) = joined {
                results[i] = Some(result);
            }
        }
        let before = report.queued;
        for (id, result) in ids.into_iter().zip(results) {
            let result =
                result.unwrap_or_else(|| Err(SpoolError::Storage("the replay task failed".into())));
            report.add(id, result);
        }
        if report.queued > before {
            // Wake the schedulers of the queued deliveries' targets.
            self.deliverer.sync_targets();
        }
    }

    /// `POST /admin/dead-letters/drop`
    pub(super) async fn drop_dead(&self, selection: Selection) -> Answer {
        let answer = match selection.resolve()? {
            Selected::Ids(ids) => {
                let asked = ids.len();
                let dropped = self.spool.drop_dead(ids).await?;
                json!({"dropped": dropped, "not_found": asked - dropped.min(asked)})
            }
            Selected::Matching(query) => {
                let mut pages = Pages::new(&*self.spool, query);
                let mut dropped = 0;
                loop {
                    let ids = pages.next_ids()?;
                    if ids.is_empty() {
                        break;
                    }
                    dropped += self.spool.drop_dead(ids).await?;
                }
                json!({ "dropped": dropped })
            }
        };
        tracing::info!(dropped = %answer["dropped"], "dead letters dropped");
        ok_json(&answer)
    }
}

fn no_such(id: &str) -> ApiError {
    ApiError::not_found(format!("no dead letter with id `{id}`"))
}

/// The query of a list request; unknown parameters are refused (a misspelt filter must not list
/// everything).
fn list_query(query: &str) -> Result<DeadQuery, ApiError> {
    let mut q = DeadQuery {
        limit: DEFAULT_LIMIT,
        ..DeadQuery::default()
    };
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*name {
            "target" => q.target = Some(value.into_owned()),
            "route" => q.route = Some(value.into_owned()),
            "after" => {
                if uuid::Uuid::parse_str(&value).is_err() {
                    return Err(ApiError::bad_request(format!(
                        "after: `{value}` is not a dead letter id"
                    )));
                }
                q.after = Some(value.into_owned());
            }
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => q.limit = n,
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "limit: `{value}` is not a number from 1 to {MAX_LIMIT}"
                    )))
                }
            },
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter `{other}`; expected target, route, limit or after"
                )))
            }
        }
    }
    Ok(q)
}

/// What the list shows of a dead letter.
fn summary(l: &DeadLetter) -> Map<String, Value> {
    let value = json!({
        "id": &*l.id,
        "event_id": &*l.event_id,
        "source": &*l.source,
        "command": &*l.command,
        "route": &*l.route,
        "target": l.target.as_deref(),
        "reason": l.reason,
        "attempts": l.attempts,
        "last_status": l.last_status,
        "created_at": rfc3339_ms(l.created_at),
        "failed_at": rfc3339_ms(l.failed_at),
    });
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// Everything stored of a dead letter.
fn detail(l: &DeadLetter) -> Value {
    let mut map = summary(l);
    map.insert(
        "last_answer".into(),
        String::from_utf8_lossy(&l.last_answer).into(),
    );
    map.insert(
        "content_type".into(),
        l.content_type.as_ref().and_then(|v| v.to_str().ok()).into(),
    );
    let body = serde_json::from_slice::<Value>(&l.body)
        .unwrap_or_else(|_| String::from_utf8_lossy(&l.body).into());
    map.insert("body".into(), body);
    let callback = l.callback.as_ref().map(|c| {
        json!({
            "app_id": c.app_id,
            "query": pairs(&c.query),
            "headers": pairs(&c.headers),
            "received_at": rfc3339_ms(c.received_at),
        })
    });
    map.insert("callback".into(), callback.into());
    Value::Object(map)
}

/// Name/value pairs as an object, as scripts see them (a repeated name keeps its last value).
fn pairs(pairs: &[(String, String)]) -> Value {
    Value::Object(
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selection(json: &str) -> Result<Selected, String> {
        serde_json::from_str::<Selection>(json)
            .map_err(|e| e.to_string())?
            .resolve()
            .map_err(|e| e.message)
    }

    #[test]
    fn selections() {
        let Ok(Selected::Ids(ids)) = selection(r#"{"ids":["a","b","a"]}"#) else {
            panic!("ids select");
        };
        assert_eq!(ids, ["a", "b"]);
        let Ok(Selected::Matching(q)) = selection(r#"{"target":"t","route":"r"}"#) else {
            panic!("target and route select");
        };
        assert_eq!(
            (q.target.as_deref(), q.route.as_deref()),
            (Some("t"), Some("r"))
        );
        let Ok(Selected::Matching(q)) = selection(r#"{"all":true}"#) else {
            panic!("all selects");
        };
        assert_eq!((q.target, q.route), (None, None));
        for bad in [
            "{}",
            r#"{"all":false}"#,
            r#"{"ids":[]}"#,
            r#"{"ids":["a"],"all":true}"#,
            r#"{"ids":["a"],"target":"t"}"#,
        ] {
            assert!(selection(bad).is_err(), "{bad}");
        }
        // A misspelt selector must not fall back to something broader.
        let err = selection(r#"{"taget":"t"}"#).unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn list_queries() {
        let q = list_query("").unwrap();
        assert_eq!(q.limit, DEFAULT_LIMIT);
        let id = uuid::Uuid::now_v7().to_string();
        let q = list_query(&format!("target=a%20b&route=r&limit=5&after={id}")).unwrap();
        assert_eq!(q.target.as_deref(), Some("a b"));
        assert_eq!(q.route.as_deref(), Some("r"));
        assert_eq!(q.limit, 5);
        assert_eq!(q.after, Some(id));
        for bad in ["limit=0", "limit=1001", "limit=x", "after=nope", "tagret=x"] {
            assert!(list_query(bad).is_err(), "{bad}");
        }
    }

    fn letter(target: &str) -> DeadLetter {
        DeadLetter {
            id: uuid::Uuid::now_v7().to_string().into(),
            event_id: "e".into(),
            source: "s".into(),
            command: "c".into(),
            route: "r".into(),
            target: Some(target.into()),
            reason: "HTTP 400".into(),
            attempts: 1,
            last_status: Some(400),
            last_answer: Bytes::new(),
            created_at: 1,
            failed_at: 2,
            content_type: None,
            body: Bytes::from_static(b"{}"),
            callback: None,
        }
    }

    #[tokio::test]
    async fn pages_cover_the_matches_and_stop_at_letters_newer_than_the_request() {
        let spool = crate::spool::MemorySpool::new(1 << 20);
        let mut a_ids = Vec::new();
        for i in 0..(PAGE * 2 + 3) {
            let l = letter(if i % 2 == 0 { "a" } else { "b" });
            if i % 2 == 0 {
                a_ids.push(l.id.to_string());
            }
            spool
                .enqueue(crate::spool::Batch {
                    deliveries: Vec::new(),
                    dead: vec![l],
                })
                .await
                .unwrap();
        }
        let query = DeadQuery {
            target: Some("a".into()),
            limit: PAGE,
            ..DeadQuery::default()
        };
        let mut pages = Pages::new(&spool, query);
        // Dead after the request began: not part of it.
        spool
            .enqueue(crate::spool::Batch {
                deliveries: Vec::new(),
                dead: vec![letter("a")],
            })
            .await
            .unwrap();
        let mut seen = Vec::new();
        loop {
            let ids = pages.next_ids().unwrap();
            if ids.is_empty() {
                break;
            }
            assert!(ids.len() <= PAGE);
            seen.extend(ids);
        }
        assert_eq!(seen, a_ids);
    }
}
