//! Dead letters and the targets' state, as an operator sees them through `switchyard dlq` and
//! the admin API: what a failed delivery or a failed script leaves behind, listing, paging,
//! showing, replaying (same `webhook-id`; through the current rules), dropping, retention,
//! restarts, `GET /admin/targets`, pause and resume.

mod support;

use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use support::*;

const WAIT: Duration = Duration::from_secs(10);
const GENERIC: &str = "sources:\n  g: {path: /hooks/g, dialect: generic, command: body.type}\n";
const FAST_RETRY: &str = "{max_attempts: 3, backoff: 20ms, max_backoff: 100ms}";

/// Runs `switchyard dlq --admin <gw> ARGS...` off the async threads (the sinks run on them).
async fn dlq(gw: &Gateway, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["dlq".to_string(), "--admin".to_string(), gw.admin_url("")];
    all.extend(args.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        run_cli(&args, None)
    })
    .await
    .unwrap()
}

/// `dlq ... --json`, which must succeed; its JSON.
async fn dlq_json(gw: &Gateway, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let (code, out, err) = dlq(gw, &args).await;
    assert_eq!(code, 0, "dlq {args:?} failed: {err}{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// The dead letters the admin API lists (first page of up to 1000).
async fn dead(gw: &Gateway, query: &str) -> Vec<Value> {
    let list = gw
        .admin_json(&format!("/admin/dead-letters?limit=1000&{query}"))
        .await;
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items: {list}"))
        .clone()
}

async fn wait_dead(gw: &Gateway, query: &str, n: usize) -> Vec<Value> {
    eventually(WAIT, &format!("{n} dead letters ({query})"), || async {
        dead(gw, query).await.len() == n
    })
    .await;
    dead(gw, query).await
}

fn ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|i| i["id"].as_str().expect("id").to_string())
        .collect()
}

async fn admin(gw: &Gateway, method: &str, path: &str, body: &str) -> Reply {
    send(
        method,
        &gw.admin_url(path),
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

fn acked_event_id(reply: &Reply) -> String {
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.json()["event_id"]
        .as_str()
        .expect("event_id")
        .to_string()
}

async fn post(gw: &Gateway, body: &str) -> String {
    acked_event_id(&post_json(&gw.url("/hooks/g"), body).await)
}

fn assert_rfc3339_recent(v: &Value) {
    let text = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    let t = humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    let age = SystemTime::now().duration_since(t).unwrap_or_default();
    assert!(age < Duration::from_secs(120), "{text} is {age:?} old");
}

async fn dead_gauge(gw: &Gateway, target: &str) -> f64 {
    gw.metric(&format!("switchyard_dead_letters{{target=\"{target}\"}}"))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_delivery_is_listed_shown_and_replayed_with_the_same_webhook_id() {
    let sink = Sink::start().await;
    let answer = format!("bad payload: {}", "x".repeat(3000));
    sink.set_default(
        Answer::status(400)
            .header("content-type", "text/plain")
            .body(&answer),
    );
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            "{GENERIC}targets:\n  t: {{url: '{}/in', retry: {FAST_RETRY}}}\nroutes:\n  - {{name: r, to: [t]}}\n",
            sink.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    let body = r#"{"type":"order.created","n":1}"#;
    let event_id = post(&gw, body).await;
    let listed = wait_dead(&gw, "", 1).await;
    let id = listed[0]["id"].as_str().unwrap().to_string();
    assert_eq!(sink.count(), 1, "400 is not retried");
    let first = &sink.received()[0];
    assert_eq!(
        first.header("webhook-id"),
        id,
        "the dead letter keeps the delivery's id"
    );

    // The table.
    let (code, table, err) = dlq(&gw, &["list"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    for column in [
        "ID",
        "FAILED AT",
        "COMMAND",
        "ROUTE",
        "TARGET",
        "ATTEMPTS",
        "STATUS",
        "REASON",
    ] {
        assert!(lines[0].contains(column), "no {column}: {table}");
    }
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[0], id, "{table}");
    assert_eq!(
        &row[2..7],
        ["order.created", "r", "t", "1", "400"],
        "{table}"
    );
    assert!(lines[1].ends_with("not retryable: HTTP 400"), "{table}");
    // Columns line up: every header starts where its values start.
    let status_at = lines[0].find("STATUS").unwrap();
    assert_eq!(&lines[1][status_at..status_at + 3], "400", "{table}");

    // The JSON of the list.
    let list = dlq_json(&gw, &["list"]).await;
    assert!(list["next"].is_null(), "{list}");
    let item = &list["items"][0];
    assert_eq!(item["id"], id.as_str());
    assert_eq!(item["event_id"], event_id.as_str());
    assert_eq!(item["source"], "g");
    assert_eq!(item["command"], "order.created");
    assert_eq!(item["route"], "r");
    assert_eq!(item["target"], "t");
    assert_eq!(item["reason"], "not retryable: HTTP 400");
    assert_eq!(item["attempts"], 1);
    assert_eq!(item["last_status"], 400);
    assert_rfc3339_recent(&item["created_at"]);
    assert_rfc3339_recent(&item["failed_at"]);

    // Everything stored: the first KiB of the answer and the body that was sent.
    let shown = dlq_json(&gw, &["show", &id]).await;
    assert_eq!(
        shown["last_answer"],
        answer[..1024],
        "the first KiB of the answer"
    );
    assert_eq!(shown["body"], serde_json::from_str::<Value>(body).unwrap());
    assert_eq!(shown["content_type"], "application/json");
    assert!(shown["callback"].is_null(), "{shown}");
    let (code, text, err) = dlq(&gw, &["show", &id]).await;
    assert_eq!(code, 0, "{err}");
    for line in [
        format!("id:           {id}"),
        format!("event_id:     {event_id}"),
        "target:       t".to_string(),
        "last_status:  400".to_string(),
        "reason:       not retryable: HTTP 400".to_string(),
        format!("last_answer:  {}", &answer[..1024]),
        r#"    "type": "order.created","#.to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
    assert_eq!(dead_gauge(&gw, "t").await, 1.0);

    // The target is fixed: the replay delivers it again under the same webhook-id.
    sink.set_default(Answer::status(200));
    let (code, out, err) = dlq(&gw, &["replay", &id]).await;
    assert_eq!(code, 0, "{err}{out}");
    assert_eq!(
        out.lines().next().unwrap(),
        "replayed 1 dead letters: 1 queued, 0 skipped, 0 kept, 0 not found"
    );
    let got = sink.wait_for(2, WAIT).await;
    assert_eq!(got[1].header("webhook-id"), id);
    assert_eq!(got[1].header("x-switchyard-event"), event_id);
    assert_eq!(
        got[1].header("x-switchyard-attempt"),
        "1",
        "a replay starts afresh"
    );
    assert_eq!(&got[1].body[..], body.as_bytes());
    eventually(WAIT, "the dead letter is gone", || async {
        dead(&gw, "").await.is_empty()
    })
    .await;
    let (code, out, _) = dlq(&gw, &["list"]).await;
    assert_eq!((code, out.as_str()), (0, "no dead letters\n"));
    assert_eq!(dead_gauge(&gw, "t").await, 0.0);

    // It is gone for `show` and for a second replay.
    let (code, _, err) = dlq(&gw, &["show", &id]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("404") && err.contains("no dead letter"),
        "{err}"
    );
    let (code, out, _) = dlq(&gw, &["replay", &id]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("1 not found") && out.contains(&id), "{out}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sink.count(), 2, "delivered once more, not twice");
}

/// Two failing targets with three and two dead letters: `to-a` goes to `a`, `to-b` to `b`.
async fn two_failing_targets() -> (RulesDir, Sink, Sink, Gateway) {
    let a = Sink::start().await;
    let b = Sink::start().await;
    a.set_default(Answer::status(422));
    b.set_default(Answer::status(400));
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            "{GENERIC}targets:
  a: {{url: '{}/a', retry: {FAST_RETRY}}}
  b: {{url: '{}/b', retry: {FAST_RETRY}}}
routes:
  - {{name: ra, commands: [to-a], to: [a]}}
  - {{name: rb, commands: [to-b], to: [b]}}
",
            a.url(),
            b.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    for (i, command) in ["to-a", "to-b", "to-a", "to-b", "to-a"].iter().enumerate() {
        post(&gw, &format!(r#"{{"type":"{command}","i":{i}}}"#)).await;
    }
    wait_dead(&gw, "", 5).await;
    (rules, a, b, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_filtered_by_target_and_route_and_paged() {
    let (_rules, _a, _b, gw) = two_failing_targets().await;
    let all = dead(&gw, "").await;

    let of_a = dlq_json(&gw, &["list", "--target", "a"]).await;
    let of_a = of_a["items"].as_array().unwrap();
    assert_eq!(of_a.len(), 3);
    assert!(of_a
        .iter()
        .all(|i| i["target"] == "a" && i["route"] == "ra"));
    let of_rb = dlq_json(&gw, &["list", "--route", "rb"]).await;
    let of_rb = of_rb["items"].as_array().unwrap();
    assert_eq!(of_rb.len(), 2);
    assert!(of_rb
        .iter()
        .all(|i| i["target"] == "b" && i["last_status"] == 400));
    let (code, out, _) = dlq(&gw, &["list", "--target", "a", "--route", "rb"]).await;
    assert_eq!((code, out.as_str()), (0, "no dead letters\n"));

    // Pages of two, oldest first, until `next` is null.
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..3 {
        let mut args = vec!["list", "--limit", "2"];
        if let Some(a) = &after {
            args.extend(["--after", a.as_str()]);
        }
        let page = dlq_json(&gw, &args).await;
        let items = page["items"].as_array().unwrap();
        paged.extend(ids(items));
        match page["next"].as_str() {
            Some(next) => {
                assert_eq!(items.len(), 2, "{page}");
                assert_eq!(next, items[1]["id"], "next is the page's last id");
                // The table says how to go on.
                let (_, table, _) = dlq(&gw, &args).await;
                assert!(
                    table.ends_with(&format!("more: add --after {next}\n")),
                    "{table}"
                );
                after = Some(next.to_string());
            }
            None => {
                assert_eq!(items.len(), 1, "{page}");
                after = None;
                break;
            }
        }
    }
    assert!(after.is_none(), "the third page is the last");
    assert_eq!(paged, ids(&all), "the pages cover the list once, in order");
    let mut sorted = paged.clone();
    sorted.sort();
    assert_eq!(paged, sorted, "oldest first");

    // Bad requests say what is wrong.
    let (code, _, err) = dlq(&gw, &["list", "--limit", "0"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("400") && err.contains("limit"), "{err}");
    let r = admin(&gw, "GET", "/admin/dead-letters?tagret=a", "").await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.json()["error"].as_str().unwrap().contains("tagret"),
        "{r:?}"
    );
    let r = admin(&gw, "GET", "/admin/dead-letters?after=nope", "").await;
    assert_eq!(r.status, 400, "{r:?}");
    let r = admin(
        &gw,
        "GET",
        "/admin/dead-letters/0190f5d2-0000-7000-8000-000000000000",
        "",
    )
    .await;
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.json()["error"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_by_target_and_all_and_drop() {
    let (_rules, a, b, gw) = two_failing_targets().await;
    let of_b = ids(&dead(&gw, "target=b").await);

    // `a` is fixed: replaying its dead letters delivers all three, b's stay.
    a.set_default(Answer::status(200));
    let (code, out, err) = dlq(&gw, &["replay", "--target", "a"]).await;
    assert_eq!(code, 0, "{err}{out}");
    assert!(
        out.starts_with("replayed 3 dead letters: 3 queued,"),
        "{out}"
    );
    let got = a.wait_for(6, WAIT).await;
    let first: Vec<&str> = got[..3].iter().map(|r| r.header("webhook-id")).collect();
    let mut again: Vec<&str> = got[3..].iter().map(|r| r.header("webhook-id")).collect();
    let mut expected = first.clone();
    expected.sort();
    again.sort();
    assert_eq!(again, expected, "the same three webhook-ids");
    assert_eq!(ids(&wait_dead(&gw, "", 2).await), of_b);

    // Dropping: one by the CLI, one by the API; gone is gone.
    let (code, out, err) = dlq(&gw, &["drop", &of_b[0]]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "dropped 1 dead letters\n"),
        "{err}"
    );
    let r = admin(
        &gw,
        "DELETE",
        &format!("/admin/dead-letters/{}", of_b[1]),
        "",
    )
    .await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = admin(
        &gw,
        "DELETE",
        &format!("/admin/dead-letters/{}", of_b[1]),
        "",
    )
    .await;
    assert_eq!(r.status, 404, "{r:?}");
    let (code, out, _) = dlq(&gw, &["drop", &of_b[0]]).await;
    assert_eq!(
        (code, out.as_str()),
        (1, "dropped 0 dead letters, 1 not found\n")
    );
    assert!(dead(&gw, "").await.is_empty());
    assert_eq!(b.count(), 2, "dropped dead letters are not delivered");

    // New failures on both; drop a route's, replay everything else.
    a.set_default(Answer::status(400));
    post(&gw, r#"{"type":"to-a"}"#).await;
    post(&gw, r#"{"type":"to-b"}"#).await;
    post(&gw, r#"{"type":"to-b"}"#).await;
    wait_dead(&gw, "", 3).await;
    let (code, out, err) = dlq(&gw, &["drop", "--route", "rb"]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "dropped 2 dead letters\n"),
        "{err}"
    );
    a.set_default(Answer::status(200));
    let report = dlq_json(&gw, &["replay", "--all"]).await;
    assert_eq!(report["queued"], 1, "{report}");
    assert_eq!(report["results"][0]["outcome"], "queued", "{report}");
    assert_eq!(report["results"][0]["deliveries"], 1, "{report}");
    a.wait_for(8, WAIT).await;
    wait_dead(&gw, "", 0).await;
    let (code, out, _) = dlq(&gw, &["replay", "--all"]).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("replayed 0 dead letters"), "{out}");

    // Refused requests.
    let (code, _, err) = dlq(&gw, &["replay"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("--all") && err.contains("--target"), "{err}");
    let (code, _, _) = dlq(&gw, &["drop"]).await;
    assert_ne!(code, 0);
    for body in [
        "{}",
        r#"{"taget":"a"}"#,
        r#"{"ids":[]}"#,
        r#"{"ids":["x"],"all":true}"#,
        "nope",
    ] {
        for path in ["/admin/dead-letters/replay", "/admin/dead-letters/drop"] {
            let r = admin(&gw, "POST", path, body).await;
            assert_eq!(r.status, 400, "{path} {body}: {r:?}");
            assert!(r.json()["error"].is_string(), "{r:?}");
        }
    }
    let r = admin(&gw, "GET", "/admin/dead-letters/replay", "").await;
    assert_eq!(r.status, 405, "{r:?}");
    assert_eq!(r.headers["allow"], "POST");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_transform_keeps_the_callback_for_replay_through_the_current_rules() {
    let sink = Sink::start().await;
    let rules = RulesDir::new();
    let route = |filter: &str, transform: &str| {
        format!(
            "{GENERIC}targets:\n  t: {{url: '{}/in', retry: {FAST_RETRY}}}\nroutes:\n  - name: r\n{filter}    transform: '{transform}'\n    to: [t]\n",
            sink.url()
        )
    };
    // Divides by zero for these callbacks.
    rules.write("r.yaml", &route("", "#{ v: 1, n: body.n / body.d }"));
    let gw = Gateway::start(rules.path());
    let small = r#"{"type":"x","n":6,"d":0}"#;
    let reply = send(
        "POST",
        &gw.url("/hooks/g?k=v"),
        &[("content-type", "application/json"), ("x-custom", "hello")],
        small.to_string(),
    )
    .await;
    let event_id = acked_event_id(&reply);
    post(&gw, r#"{"type":"x","n":500,"d":0}"#).await;
    let listed = wait_dead(&gw, "route=r", 2).await;
    let letter = &listed[0];
    assert_eq!(letter["event_id"], event_id.as_str());
    assert!(letter["target"].is_null(), "{letter}");
    assert_eq!(letter["attempts"], 0);
    assert!(letter["last_status"].is_null());
    let reason = letter["reason"].as_str().unwrap();
    assert!(reason.starts_with("transform failed"), "{reason}");
    let id = letter["id"].as_str().unwrap().to_string();

    // The callback itself is kept: body, query and headers.
    let shown = dlq_json(&gw, &["show", &id]).await;
    assert_eq!(shown["body"], serde_json::from_str::<Value>(small).unwrap());
    assert_eq!(shown["callback"]["query"]["k"], "v", "{shown}");
    assert_eq!(shown["callback"]["headers"]["x-custom"], "hello", "{shown}");
    let (_, table, _) = dlq(&gw, &["list"]).await;
    let row = table.lines().find(|l| l.starts_with(&id)).unwrap();
    let target_at = table.lines().next().unwrap().find("TARGET").unwrap();
    assert!(row[target_at..].starts_with("- "), "no target: {table}");

    // Replayed before the fix: it fails the same way and stays.
    let (code, out, _) = dlq(&gw, &["replay", &id]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("1 kept") && out.contains("transform failed"),
        "{out}"
    );
    assert_eq!(dead(&gw, "").await.len(), 2);
    assert_eq!(sink.count(), 0);

    // Fix the rule: a new transform, and a filter that now turns the large one away.
    let g0 = gw.admin_json("/admin/rules").await["generation"]
        .as_u64()
        .unwrap();
    rules.write(
        "r.yaml",
        &route("    filter: 'body.n < 100'\n", "#{ v: 2, n: body.n }"),
    );
    eventually(WAIT, "the fixed rules are loaded", || async {
        gw.admin_json("/admin/rules").await["generation"]
            .as_u64()
            .unwrap()
            > g0
    })
    .await;
    let report = dlq_json(&gw, &["replay", "--route", "r"]).await;
    assert_eq!(
        (report["queued"].as_u64(), report["skipped"].as_u64()),
        (Some(1), Some(1)),
        "{report}"
    );
    let skipped = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["outcome"] == "skipped")
        .unwrap();
    assert!(
        skipped["reason"].as_str().unwrap().contains("filter"),
        "{report}"
    );
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(
        got[0].json(),
        json!({"v": 2, "n": 6}),
        "the current transform's output"
    );
    assert_eq!(got[0].header("x-switchyard-event"), event_id);
    assert_eq!(got[0].header("x-switchyard-route"), "r");
    wait_dead(&gw, "", 0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        sink.count(),
        1,
        "the filtered-out callback is not delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_of_a_removed_target_are_dead_letters_kept_until_it_is_back() {
    let down = Sink::down().await;
    let sink = Sink::start().await;
    let rules = RulesDir::new();
    let with_gone = |gone_url: &str| {
        format!(
            "{GENERIC}targets:
  gone: {{url: '{gone_url}/in', retry: {{max_attempts: 1000, backoff: 1s, max_backoff: 2s}}}}
  other: {{url: '{}/other'}}
routes:
  - {{name: r, to: [gone]}}
",
            sink.url()
        )
    };
    let without_gone = format!(
        "{GENERIC}targets:\n  other: {{url: '{}/other'}}\nroutes:\n  - {{name: r, to: [other]}}\n",
        sink.url()
    );
    rules.write("r.yaml", &with_gone(&format!("http://{down}")));
    let gw = Gateway::start(rules.path());
    let event_id = post(&gw, r#"{"type":"x"}"#).await;
    rules.write("r.yaml", &without_gone);
    let listed = wait_dead(&gw, "target=gone", 1).await;
    assert_eq!(listed[0]["reason"], "target removed");
    assert_eq!(listed[0]["event_id"], event_id.as_str());
    let id = listed[0]["id"].as_str().unwrap().to_string();

    let (code, out, _) = dlq(&gw, &["replay", &id]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("1 kept"), "{out}");
    assert!(
        out.contains(&format!(
            "kept       {id}: target `gone` is not in the current rules"
        )),
        "{out}"
    );
    assert_eq!(ids(&dead(&gw, "").await), [id.as_str()], "kept means kept");

    // The target is back (now up): the replay goes to its current URL.
    rules.write("r.yaml", &with_gone(&sink.url()));
    eventually(WAIT, "the target is back in the rules", || async {
        let (_, out, _) = dlq(&gw, &["replay", &id, "--json"]).await;
        serde_json::from_str::<Value>(&out).unwrap()["queued"] == 1
    })
    .await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].uri, "/in");
    assert_eq!(got[0].header("webhook-id"), id);
    wait_dead(&gw, "", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_survive_a_restart_and_go_after_their_retention() {
    let sink = Sink::start().await;
    sink.set_default(Answer::status(400).body("no"));
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            "{GENERIC}targets:\n  t: {{url: '{}/in', retry: {FAST_RETRY}}}\nroutes:\n  - {{name: r, to: [t]}}\n",
            sink.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    post(&gw, r#"{"type":"x"}"#).await;
    let before = wait_dead(&gw, "", 1).await;
    let shown = gw
        .admin_json(&format!(
            "/admin/dead-letters/{}",
            before[0]["id"].as_str().unwrap()
        ))
        .await;

    let data = gw.terminate();
    let gw = Gateway::start_in(rules.path(), data, &[], &[]);
    assert_eq!(
        dead(&gw, "").await,
        before,
        "the same dead letter after a restart"
    );
    let again = gw
        .admin_json(&format!(
            "/admin/dead-letters/{}",
            before[0]["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(again, shown);
    assert_eq!(dead_gauge(&gw, "t").await, 1.0);

    // With a retention shorter than its age, it is dropped.
    let data = gw.terminate();
    let gw = Gateway::start_in(rules.path(), data, &["--dead-letter-retention", "1s"], &[]);
    wait_dead(&gw, "", 0).await;
    gw.wait_for_log("dead letters past their retention dropped", WAIT)
        .await;
    assert_eq!(dead_gauge(&gw, "t").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_gateway_drops_dead_letters_once_their_retention_passes() {
    let sink = Sink::start().await;
    sink.set_default(Answer::status(400));
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            "{GENERIC}targets:\n  t: {{url: '{}/in', retry: {FAST_RETRY}}}\nroutes:\n  - {{name: r, to: [t]}}\n",
            sink.url()
        ),
    );
    let gw = Gateway::start_with(rules.path(), &["--dead-letter-retention", "4s"], &[]);
    post(&gw, r#"{"type":"x"}"#).await;
    // Kept for (at least) four seconds, then dropped without a restart.
    wait_dead(&gw, "", 1).await;
    eventually(
        Duration::from_secs(20),
        "the dead letter expired",
        || async { dead(&gw, "").await.is_empty() },
    )
    .await;
}

fn target<'a>(targets: &'a Value, name: &str) -> &'a Value {
    targets["targets"]
        .as_array()
        .unwrap_or_else(|| panic!("no targets: {targets}"))
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no target {name}: {targets}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_state_and_pause_and_resume() {
    let ok = Sink::start().await;
    let bad = Sink::start().await;
    bad.set_default(Answer::status(400));
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            "{GENERIC}targets:
  ok: {{url: '{}/ok'}}
  bad: {{url: '{}/bad', retry: {FAST_RETRY}}}
routes:
  - {{name: both, commands: [both], to: [ok, bad]}}
  - {{name: only-ok, commands: [only-ok], to: [ok]}}
",
            ok.url(),
            bad.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    post(&gw, r#"{"type":"both"}"#).await;
    // Counters and queue states settle just after the sink has answered.
    eventually(WAIT, "one delivered, one dead", || async {
        let state = gw.admin_json("/admin/targets").await;
        let (good, failing) = (target(&state, "ok"), target(&state, "bad"));
        good["delivered"] == 1
            && good["depth"] == 0
            && failing["dead_letters"] == 1
            && failing["depth"] == 0
    })
    .await;
    let state = gw.admin_json("/admin/targets").await;
    let good = target(&state, "ok");
    for (key, value) in [
        ("configured", json!(true)),
        ("paused", json!(false)),
        ("queued", json!(0)),
        ("in_flight", json!(0)),
        ("depth", json!(0)),
        ("failed", json!(0)),
        ("dead_letters", json!(0)),
        ("oldest_age_seconds", Value::Null),
        ("last_error", Value::Null),
    ] {
        assert_eq!(good[key], value, "ok.{key}: {state}");
    }
    let failing = target(&state, "bad");
    assert_eq!(failing["failed"], 1, "{state}");
    assert_eq!(failing["delivered"], 0, "{state}");
    assert_eq!(failing["dead_letters"], 1, "{state}");
    assert!(
        failing["last_error"].as_str().unwrap().contains("HTTP 400"),
        "{state}"
    );
    assert_rfc3339_recent(&failing["last_error_at"]);
    assert_eq!(dead_gauge(&gw, "bad").await, 1.0);

    // Paused: deliveries wait in the queue.
    let r = admin(&gw, "POST", "/admin/targets/ok/pause", "").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["name"], "ok");
    assert_eq!(r.json()["paused"], true);
    for i in 0..3 {
        post(&gw, &format!(r#"{{"type":"only-ok","i":{i}}}"#)).await;
    }
    let state = gw.admin_json("/admin/targets").await;
    let paused = target(&state, "ok");
    assert_eq!(paused["paused"], true, "{state}");
    assert_eq!(paused["queued"], 3, "{state}");
    assert_eq!(paused["depth"], 3, "{state}");
    assert!(paused["oldest_age_seconds"].as_f64().is_some(), "{state}");
    assert_eq!(
        gw.metric(r#"switchyard_queue_depth{target="ok"}"#).await,
        3.0
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ok.count(), 1, "nothing is sent to a paused target");

    // Resumed: they are delivered.
    let r = admin(&gw, "POST", "/admin/targets/ok/resume", "").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["paused"], false);
    let got = ok.wait_for(4, WAIT).await;
    let mut sent: Vec<i64> = got[1..]
        .iter()
        .map(|r| r.json()["i"].as_i64().unwrap())
        .collect();
    sent.sort();
    assert_eq!(sent, [0, 1, 2]);
    eventually(WAIT, "the queue is empty", || async {
        target(&gw.admin_json("/admin/targets").await, "ok")["depth"] == 0
    })
    .await;

    // Unknown targets and wrong methods.
    let r = admin(&gw, "POST", "/admin/targets/nope/pause", "").await;
    assert_eq!(r.status, 404, "{r:?}");
    assert!(
        r.json()["error"].as_str().unwrap().contains("nope"),
        "{r:?}"
    );
    let r = admin(&gw, "GET", "/admin/targets/ok/pause", "").await;
    assert_eq!(r.status, 405, "{r:?}");
    let r = admin(&gw, "POST", "/admin/targets", "").await;
    assert_eq!(r.status, 405, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_says_when_the_admin_api_cannot_be_reached_and_reads_switchyard_admin() {
    let down = Sink::down().await;
    let url = format!("http://{down}");
    let (code, out, err) = tokio::task::spawn_blocking({
        let url = url.clone();
        move || run_cli(&["dlq", "--admin", &url, "list"], None)
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(
        err.starts_with(&format!("error: cannot reach the admin API at {url}: ")),
        "{err}"
    );

    let sink = Sink::start().await;
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            "{GENERIC}targets:\n  t: {{url: '{}/in'}}\nroutes:\n  - {{name: r, to: [t]}}\n",
            sink.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    let admin = gw.admin_url("");
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        run_cli_env(&["dlq", "list"], None, &[("SWITCHYARD_ADMIN", &admin)])
    })
    .await
    .unwrap();
    assert_eq!((code, out.as_str()), (0, "no dead letters\n"), "{err}");
    // An id that does not exist: the API's answer, and exit 1.
    let (code, _, err) = dlq(&gw, &["show", "0190f5d2-0000-7000-8000-000000000000"]).await;
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: the admin API answered 404: no dead letter"),
        "{err}"
    );
}
