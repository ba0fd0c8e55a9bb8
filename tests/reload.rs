//! SPEC §6 hot reload, as the operator and the downstream observe it: every way a rule file
//! changes on disk is picked up, a broken edit keeps the running rules and says what is wrong
//! (FILE:LINE:COL in the admin API, the log and the metrics), SIGHUP reloads, and queued
//! deliveries follow their target's current definition.

mod support;

use std::path::Path;
use std::time::Duration;

use support::*;

const GENERIC: &str = "sources:\n  g: {path: /hooks/g, dialect: generic, command: body.type}\n";
const WAIT: Duration = Duration::from_secs(10);

/// One generic source, targets `a` and `b`, and one route `r` to `to`.
fn rules_to(a: &Sink, b: &Sink, to: &str) -> String {
    format!(
        "{GENERIC}targets:\n  a: {{url: '{}/a'}}\n  b: {{url: '{}/b'}}\nroutes:\n  - name: r\n    to: [{to}]\n",
        a.url(),
        b.url()
    )
}

async fn generation(gw: &Gateway) -> u64 {
    gw.admin_json("/admin/rules").await["generation"]
        .as_u64()
        .expect("generation")
}

/// Waits for a generation above `above`; checks the metric agrees; returns it.
async fn wait_generation_above(gw: &Gateway, above: u64) -> u64 {
    eventually(
        WAIT,
        &format!("a rules generation above {above}"),
        || async { generation(gw).await > above },
    )
    .await;
    let now = generation(gw).await;
    assert_eq!(
        gw.metric("switchyard_rules_generation").await,
        now as f64,
        "switchyard_rules_generation disagrees with /admin/rules"
    );
    now
}

async fn reloads(gw: &Gateway, outcome: &str) -> f64 {
    gw.metric(&format!(
        "switchyard_rules_reloads_total{{outcome=\"{outcome}\"}}"
    ))
    .await
}

/// Posts a callback tagged `n` and waits for it at `sink` (and checks `other` did not get it).
async fn routed_to(gw: &Gateway, n: u32, sink: &Sink, other: &Sink) {
    let before_other = other.count();
    let before = sink.count();
    let reply = post_json(&gw.url("/hooks/g"), &format!(r#"{{"type":"x","n":{n}}}"#)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let got = sink.wait_for(before + 1, WAIT).await;
    assert!(
        got.iter().any(|r| r.json()["n"] == n),
        "callback {n} not at {}",
        sink.url()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stray: Vec<_> = other.received()[before_other..]
        .iter()
        .filter(|r| r.json()["n"] == n)
        .map(|r| r.uri.clone())
        .collect();
    assert!(stray.is_empty(), "callback {n} also went to {stray:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_place_write_is_picked_up() {
    let (a, b) = (Sink::start().await, Sink::start().await);
    let rules = RulesDir::new();
    let file = rules.write("r.yaml", &rules_to(&a, &b, "a"));
    let gw = Gateway::start(rules.path());
    let g0 = generation(&gw).await;
    routed_to(&gw, 1, &a, &b).await;

    // Truncate and rewrite the same file (same inode).
    std::fs::write(&file, rules_to(&a, &b, "b")).unwrap();
    let g1 = wait_generation_above(&gw, g0).await;
    assert_eq!(g1, g0 + 1);
    routed_to(&gw, 2, &b, &a).await;
    assert_eq!(reloads(&gw, "ok").await, 1.0);
    assert!(gw.admin_json("/admin/rules").await["last_reload_error"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_editor_save_by_rename_is_picked_up() {
    let (a, b) = (Sink::start().await, Sink::start().await);
    let rules = RulesDir::new();
    let file = rules.write("r.yaml", &rules_to(&a, &b, "a"));
    let gw = Gateway::start(rules.path());
    let g0 = generation(&gw).await;
    routed_to(&gw, 1, &a, &b).await;

    // Write a temporary file, then rename it over the rule file (a new inode).
    let tmp = rules.write(".r.yaml.swp", &rules_to(&a, &b, "b"));
    std::fs::rename(&tmp, &file).unwrap();
    wait_generation_above(&gw, g0).await;
    routed_to(&gw, 2, &b, &a).await;
}

/// The layout the kubelet gives a mounted ConfigMap.
fn configmap_version(dir: &Path, version: &str, text: &str) {
    let v = dir.join(version);
    std::fs::create_dir(&v).unwrap();
    std::fs::write(v.join("rules.yaml"), text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    let (a, b) = (Sink::start().await, Sink::start().await);
    let rules = RulesDir::new();
    let dir = rules.path();
    configmap_version(dir, "..2026_a", &rules_to(&a, &b, "a"));
    symlink("..2026_a", dir.join("..data")).unwrap();
    symlink("..data/rules.yaml", dir.join("rules.yaml")).unwrap();
    let gw = Gateway::start(dir);
    let g0 = generation(&gw).await;
    routed_to(&gw, 1, &a, &b).await;

    // The kubelet's atomic update: a new version directory, a temporary `..data_tmp` link to
    // it renamed over `..data`, then the old version removed.
    configmap_version(dir, "..2026_b", &rules_to(&a, &b, "b"));
    symlink("..2026_b", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join("..2026_a")).unwrap();

    wait_generation_above(&gw, g0).await;
    routed_to(&gw, 2, &b, &a).await;
    let files = gw.admin_json("/admin/rules").await["files"].clone();
    assert_eq!(files.as_array().map(Vec::len), Some(1), "{files}");
    assert!(
        files[0].as_str().unwrap().ends_with("rules.yaml"),
        "{files}"
    );
}

/// Waits until `/admin/rules` shows a failed reload; returns its error lines.
async fn wait_reload_error(gw: &Gateway) -> Vec<String> {
    eventually(WAIT, "a reload error in /admin/rules", || async {
        !gw.admin_json("/admin/rules").await["last_reload_error"].is_null()
    })
    .await;
    let state = gw.admin_json("/admin/rules").await;
    state["last_reload_error"]["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no error list: {state}"))
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect()
}

/// `errors` has one `FILE:LINE:COL: …` line for `file_suffix` at `line`, saying `what`.
fn has_located_error(errors: &[String], file_suffix: &str, line: u32, what: &str) -> String {
    errors
        .iter()
        .find(|e| {
            let Some((place, message)) = e.split_once(": ") else {
                return false;
            };
            let mut parts = place.rsplitn(3, ':');
            let col = parts.next().and_then(|c| c.parse::<u32>().ok());
            let l = parts.next().and_then(|l| l.parse::<u32>().ok());
            let file = parts.next().unwrap_or("");
            file.ends_with(file_suffix)
                && l == Some(line)
                && col.is_some_and(|c| c > 0)
                && message.contains(what)
        })
        .unwrap_or_else(|| panic!("no `{file_suffix}:{line}:COL: …{what}…` among {errors:#?}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_edit_keeps_the_running_rules_and_says_where() {
    let (a, b) = (Sink::start().await, Sink::start().await);
    let rules = RulesDir::new();
    let file = rules.write("r.yaml", &rules_to(&a, &b, "a"));
    let gw = Gateway::start(rules.path());
    let g0 = generation(&gw).await;
    routed_to(&gw, 1, &a, &b).await;

    let good = rules_to(&a, &b, "a");
    // (the broken text, the file and line the error must name, words of the message)
    let cases: Vec<(String, &str, u32, &str)> = vec![
        (
            // A YAML syntax error: the flow sequence of line 8 runs into line 9.
            good.replace("to: [a]", "to: [a\n  - name: s"),
            "r.yaml",
            9,
            "",
        ),
        (good.replace("to: [a]", "to: [nope]"), "r.yaml", 8, "nope"),
        (
            good.replace("    to: [a]", "    filter: 'body.type == '\n    to: [a]"),
            "r.yaml",
            8,
            "script",
        ),
    ];
    let mut errors_seen = 0.0;
    for (n, (broken, file_suffix, line, what)) in cases.into_iter().enumerate() {
        std::fs::write(&file, &broken).unwrap();
        let errors = wait_reload_error(&gw).await;
        let shown = has_located_error(&errors, file_suffix, line, what);
        // The same located line is in the log.
        gw.wait_for_log(&shown, Duration::from_secs(2)).await;
        let counted = reloads(&gw, "error").await;
        assert!(
            counted > errors_seen,
            "reload errors not counted: {counted}"
        );
        errors_seen = counted;
        // The running rules stay: same generation, still routed to `a`.
        assert_eq!(generation(&gw).await, g0);
        routed_to(&gw, 100 + n as u32, &a, &b).await;

        // Fixing it (here: back to the running rules) clears the error.
        std::fs::write(&file, &good).unwrap();
        eventually(WAIT, "the reload error cleared", || async {
            gw.admin_json("/admin/rules").await["last_reload_error"].is_null()
        })
        .await;
        assert_eq!(
            generation(&gw).await,
            g0,
            "identical rules are not a new generation"
        );
    }

    // A broken script file names the script and its line.
    rules.write(
        "scripts/shape.rhai",
        "#{\n  kind: body.type,\n  n: body.n +\n}\n",
    );
    std::fs::write(
        &file,
        good.replace(
            "    to: [a]",
            "    transform_file: scripts/shape.rhai\n    to: [a]",
        ),
    )
    .unwrap();
    let errors = wait_reload_error(&gw).await;
    let shown = has_located_error(&errors, "scripts/shape.rhai", 4, "");
    gw.wait_for_log(&shown, Duration::from_secs(2)).await;
    routed_to(&gw, 200, &a, &b).await;

    // Fixing the script takes effect at once: a new generation with the transform.
    rules.write(
        "scripts/shape.rhai",
        "#{\n  kind: body.type,\n  n: body.n + 1,\n}\n",
    );
    let g1 = wait_generation_above(&gw, g0).await;
    assert!(gw.admin_json("/admin/rules").await["last_reload_error"].is_null());
    let before = a.count();
    let reply = post_json(&gw.url("/hooks/g"), r#"{"type":"x","n":300}"#).await;
    assert_eq!(reply.status, 200);
    let got = a.wait_for(before + 1, WAIT).await;
    assert_eq!(
        got[before].json(),
        serde_json::json!({"kind": "x", "n": 301})
    );
    assert_eq!(generation(&gw).await, g1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_script_file_is_picked_up() {
    let sink = Sink::start().await;
    let rules = RulesDir::new();
    rules.write("scripts/shape.rhai", "#{ version: 1, kind: body.type }\n");
    rules.write(
        "r.yaml",
        &format!(
            "{GENERIC}targets:\n  t: {{url: '{}/t'}}\nroutes:\n  - {{name: r, transform_file: scripts/shape.rhai, to: [t]}}\n",
            sink.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    let g0 = generation(&gw).await;
    post_json(&gw.url("/hooks/g"), r#"{"type":"x"}"#).await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(
        got[0].json(),
        serde_json::json!({"version": 1, "kind": "x"})
    );

    rules.write("scripts/shape.rhai", "#{ version: 2, kind: body.type }\n");
    wait_generation_above(&gw, g0).await;
    post_json(&gw.url("/hooks/g"), r#"{"type":"y"}"#).await;
    let got = sink.wait_for(2, WAIT).await;
    assert_eq!(
        got[1].json(),
        serde_json::json!({"version": 2, "kind": "y"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads() {
    let (a, b) = (Sink::start().await, Sink::start().await);
    let rules = RulesDir::new();
    rules.write("r.yaml", &rules_to(&a, &b, "a"));
    let gw = Gateway::start(rules.path());
    let g0 = generation(&gw).await;
    assert_eq!(reloads(&gw, "ok").await, 0.0);
    gw.signal("HUP");
    // Nothing changed on disk, yet SIGHUP loads and swaps in a fresh rule set.
    let g1 = wait_generation_above(&gw, g0).await;
    assert_eq!(g1, g0 + 1);
    assert_eq!(reloads(&gw, "ok").await, 1.0);
    gw.wait_for_log("rules reloaded", Duration::from_secs(2))
        .await;
    routed_to(&gw, 1, &a, &b).await;
    gw.signal("HUP");
    wait_generation_above(&gw, g1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_deliveries_of_a_removed_target_fail_as_target_removed() {
    let a = Sink::start().await;
    let down = Sink::down().await;
    let rules = RulesDir::new();
    let with_down = format!(
        "{GENERIC}targets:
  a: {{url: '{}/a'}}
  down: {{url: 'http://{down}/x', retry: {{max_attempts: 1000, backoff: 50ms, max_backoff: 200ms}}}}
routes:
  - {{name: r, to: [down]}}
",
        a.url()
    );
    let file = rules.write("r.yaml", &with_down);
    let gw = Gateway::start(rules.path());
    let g0 = generation(&gw).await;
    for n in 0..2 {
        let reply = post_json(&gw.url("/hooks/g"), &format!(r#"{{"type":"x","n":{n}}}"#)).await;
        assert_eq!(reply.status, 200);
    }
    eventually(WAIT, "both deliveries retrying", || async {
        gw.metric(r#"switchyard_deliveries_total{route="r",target="down",outcome="retry"}"#)
            .await
            >= 4.0
    })
    .await;
    assert_eq!(
        gw.metric(r#"switchyard_queue_depth{target="down"}"#).await,
        2.0
    );

    // The target is removed from the rules; the route now goes to `a`.
    std::fs::write(
        &file,
        format!(
            "{GENERIC}targets:\n  a: {{url: '{}/a'}}\nroutes:\n  - {{name: r, to: [a]}}\n",
            a.url()
        ),
    )
    .unwrap();
    wait_generation_above(&gw, g0).await;
    eventually(WAIT, "the queued deliveries failed", || async {
        gw.metric(r#"switchyard_deliveries_total{route="r",target="down",outcome="failed"}"#)
            .await
            == 2.0
    })
    .await;
    let removed: Vec<String> = gw
        .logs()
        .into_iter()
        .filter(|l| l.contains("delivery failed") && l.contains("target removed"))
        .collect();
    assert_eq!(removed.len(), 2, "{removed:#?}");
    // The dead letters are stored just after the failure is counted.
    eventually(WAIT, "the queue of the removed target is empty", || async {
        gw.metric(r#"switchyard_queue_depth{target="down"}"#).await == 0.0
    })
    .await;
    // New callbacks follow the new route; the old ones are not re-routed.
    post_json(&gw.url("/hooks/g"), r#"{"type":"x","n":9}"#).await;
    let got = a.wait_for(1, WAIT).await;
    assert_eq!(got[0].json()["n"], 9);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_delivery_uses_its_targets_current_definition() {
    let down = Sink::down().await;
    let moved = Sink::start().await;
    let rules = RulesDir::new();
    let target = |url: &str, token: &str| {
        format!(
            "{GENERIC}targets:
  t: {{url: '{url}', headers: {{Authorization: 'Bearer {token}'}}, retry: {{max_attempts: 1000, backoff: 50ms, max_backoff: 200ms}}}}
routes:
  - {{name: r, to: [t]}}
"
        )
    };
    let file = rules.write("r.yaml", &target(&format!("http://{down}/old"), "old"));
    let gw = Gateway::start(rules.path());
    let g0 = generation(&gw).await;
    let body = r#"{"type":"x","n":1}"#;
    post_json(&gw.url("/hooks/g"), body).await;
    eventually(WAIT, "the delivery retrying", || async {
        gw.metric(r#"switchyard_deliveries_total{route="r",target="t",outcome="retry"}"#)
            .await
            >= 2.0
    })
    .await;

    // The target moves (new URL, new credentials): the queued delivery follows it.
    std::fs::write(&file, target(&format!("{}/new", moved.url()), "new")).unwrap();
    wait_generation_above(&gw, g0).await;
    let got = moved.wait_for(1, WAIT).await;
    assert_eq!(got[0].uri, "/new");
    assert_eq!(got[0].header("authorization"), "Bearer new");
    assert_eq!(got[0].body, body.as_bytes());
    assert_ne!(got[0].header("x-switchyard-attempt"), "1");
}

/// The largest number of requests in flight at once at `sink`, each held for `hold` from its
/// arrival.
fn most_in_flight(got: &[Received], hold: Duration) -> usize {
    let mut at: Vec<std::time::Instant> = got.iter().map(|r| r.at).collect();
    at.sort();
    (0..at.len())
        .map(|i| at[i..].iter().take_while(|t| **t - at[i] < hold).count())
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_raises_and_lowers_a_targets_concurrency_for_queued_deliveries() {
    const HOLD: Duration = Duration::from_millis(400);
    let sink = Sink::start().await;
    sink.set_default(Answer::status(200).delayed(HOLD));
    let rules = RulesDir::new();
    // Eight routes to one target: one callback queues eight deliveries at once.
    let routes: String = (1..=8)
        .map(|i| format!("  - {{name: r{i}, to: [t]}}\n"))
        .collect();
    let with = |concurrency: u32| {
        format!(
            "{GENERIC}targets:\n  t: {{url: '{}/x', concurrency: {concurrency}}}\nroutes:\n{routes}",
            sink.url()
        )
    };
    let file = rules.write("r.yaml", &with(1));
    let gw = Gateway::start(rules.path());
    let g0 = generation(&gw).await;
    post_json(&gw.url("/hooks/g"), r#"{"type":"x","n":1}"#).await;
    sink.wait_for(1, WAIT).await;

    // Raised while seven wait behind the one in flight: they go four at a time.
    std::fs::write(&file, with(4)).unwrap();
    let g1 = wait_generation_above(&gw, g0).await;
    let raised_at = std::time::Instant::now();
    let got = sink.wait_for(8, WAIT).await;
    let after: Vec<Received> = got.into_iter().filter(|r| r.at >= raised_at).collect();
    assert!(
        most_in_flight(&after, HOLD) >= 3,
        "concurrency 4 after the reload, yet at most {} in flight",
        most_in_flight(&after, HOLD)
    );

    // Lowered again: once the attempts in flight have ended, one at a time.
    std::fs::write(&file, with(1)).unwrap();
    wait_generation_above(&gw, g1).await;
    tokio::time::sleep(HOLD * 2).await;
    let lowered_at = std::time::Instant::now();
    post_json(&gw.url("/hooks/g"), r#"{"type":"x","n":2}"#).await;
    let got = sink.wait_for(16, WAIT).await;
    let after: Vec<Received> = got.into_iter().filter(|r| r.at >= lowered_at).collect();
    assert_eq!(after.len(), 8);
    assert_eq!(
        most_in_flight(&after, HOLD),
        1,
        "concurrency 1 after the reload"
    );
}
