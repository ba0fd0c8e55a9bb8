//! SPEC §7 admin listener, as an operator (and Prometheus) sees it: health and readiness, the
//! metrics after real traffic, the rules' state, and its separation from the public ingress.

mod support;

use std::time::{Duration, SystemTime};

use support::*;

const WAIT: Duration = Duration::from_secs(10);

async fn get(url: &str) -> Reply {
    send("GET", url, &[], "").await
}

/// A rule set with a working target, a target that is down, and a route whose filter fails.
fn traffic_rules(up: &Sink, down: std::net::SocketAddr) -> String {
    format!(
        "sources:
  g: {{path: /hooks/g, dialect: generic, command: body.type}}
targets:
  up: {{url: '{}/up'}}
  down: {{url: 'http://{down}/down', retry: {{max_attempts: 1000, backoff: 50ms, max_backoff: 200ms}}}}
routes:
  - {{name: to-up, commands: [ping], to: [up]}}
  - {{name: to-down, commands: [queued], to: [down]}}
  - {{name: broken, commands: [ping], filter: '1 / 0 == 1', to: [up]}}
",
        up.url()
    )
}

/// The value of the sample whose line starts with `prefix` (name and labels, possibly partial).
fn sample_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let up = Sink::start().await;
    let rules = RulesDir::new();
    rules.write("r.yaml", &traffic_rules(&up, up.addr));
    let gw = Gateway::start(rules.path());
    let health = get(&gw.admin_url("/healthz")).await;
    assert_eq!(health.status, 200, "{health:?}");
    let ready = get(&gw.admin_url("/readyz")).await;
    assert_eq!(ready.status, 200, "{ready:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_without_sources_until_a_reload_adds_one() {
    let up = Sink::start().await;
    let rules = RulesDir::new();
    // Valid, but nothing can be received.
    let file = rules.write(
        "r.yaml",
        &format!("targets:\n  up: {{url: '{}/up'}}\n", up.url()),
    );
    let gw = Gateway::start(rules.path());
    assert_eq!(get(&gw.admin_url("/healthz")).await.status, 200, "alive");
    let ready = get(&gw.admin_url("/readyz")).await;
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(ready.body.contains("source"), "{ready:?}");

    std::fs::write(&file, traffic_rules(&up, up.addr)).unwrap();
    eventually(WAIT, "ready after the reload", || async {
        get(&gw.admin_url("/readyz")).await.status == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_traffic() {
    let up = Sink::start().await;
    let down = Sink::down().await;
    let rules = RulesDir::new();
    rules.write("r.yaml", &traffic_rules(&up, down));
    let gw = Gateway::start(rules.path());
    for _ in 0..2 {
        let r = post_json(&gw.url("/hooks/g"), r#"{"type":"ping"}"#).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let r = post_json(&gw.url("/hooks/g"), r#"{"type":"queued"}"#).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = post_json(&gw.url("/hooks/g"), r#"{"type":"nobody-wants-this"}"#).await;
    assert_eq!(r.status, 200, "{r:?}");
    up.wait_for(2, WAIT).await;
    gw.signal("HUP");
    eventually(WAIT, "the SIGHUP reload", || async {
        gw.metric(r#"switchyard_rules_reloads_total{outcome="ok"}"#)
            .await
            == 1.0
    })
    .await;
    // The down target's delivery has been queued for a while.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let resp = client().get(gw.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = resp.text().await.unwrap();
    let value = |prefix: &str| {
        sample_value(&text, prefix).unwrap_or_else(|| panic!("no `{prefix}` in:\n{text}"))
    };

    assert_eq!(
        value(r#"switchyard_callbacks_total{source="g",command="ping",outcome="routed"}"#),
        2.0
    );
    assert_eq!(
        value(
            r#"switchyard_callbacks_total{source="g",command="nobody-wants-this",outcome="unrouted"}"#
        ),
        1.0
    );
    assert!(
        text.contains("# TYPE switchyard_ack_duration_seconds histogram"),
        "{text}"
    );
    assert!(value(r#"switchyard_ack_duration_seconds_bucket{source="g",le="+Inf"}"#) >= 4.0);
    assert_eq!(
        value(r#"switchyard_ack_duration_seconds_count{source="g"}"#),
        4.0
    );
    assert_eq!(
        value(r#"switchyard_deliveries_total{route="to-up",target="up",outcome="delivered"}"#),
        2.0
    );
    assert!(
        value(r#"switchyard_deliveries_total{route="to-down",target="down",outcome="retry"}"#)
            >= 1.0
    );
    assert!(
        text.contains("# TYPE switchyard_delivery_duration_seconds histogram"),
        "{text}"
    );
    assert!(value(r#"switchyard_delivery_duration_seconds_count{target="up"}"#) >= 2.0);
    assert!(value(r#"switchyard_delivery_duration_seconds_bucket{target="up",le="+Inf"}"#) >= 2.0);
    assert_eq!(value(r#"switchyard_queue_depth{target="up"}"#), 0.0);
    assert_eq!(value(r#"switchyard_queue_depth{target="down"}"#), 1.0);
    assert_eq!(
        value(r#"switchyard_queue_oldest_seconds{target="up"}"#),
        0.0
    );
    let oldest = value(r#"switchyard_queue_oldest_seconds{target="down"}"#);
    assert!((1.0..600.0).contains(&oldest), "oldest queued {oldest}s");
    let generation = gw.admin_json("/admin/rules").await["generation"]
        .as_u64()
        .unwrap();
    assert_eq!(value("switchyard_rules_generation "), generation as f64);
    assert_eq!(
        value(r#"switchyard_rules_reloads_total{outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        value(r#"switchyard_script_errors_total{route="broken",stage="filter"}"#),
        2.0
    );
    // The spool's transactions: the two routed callbacks were stored, the two delivered copies
    // settled, each transaction timed.
    let commits = value(r#"switchyard_spool_commits_total{outcome="ok"}"#);
    assert!(commits >= 1.0, "{text}");
    assert!(value(r#"switchyard_spool_commit_ops_total{op="store"}"#) >= 2.0);
    assert!(value(r#"switchyard_spool_commit_ops_total{op="settle"}"#) >= 2.0);
    assert!(
        text.contains("# TYPE switchyard_spool_commit_duration_seconds histogram"),
        "{text}"
    );
    assert!(value("switchyard_spool_commit_duration_seconds_count") >= 1.0);
    // A second after those transactions, redb is checkpointed and its write-ahead log starts over.
    eventually(WAIT, "a checkpoint of the spool", || async {
        let text = client()
            .get(gw.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        sample_value(&text, "switchyard_spool_checkpoints_total ").is_some_and(|n| n >= 1.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_rules_describes_the_running_rules() {
    let up = Sink::start().await;
    let rules = RulesDir::new();
    rules.write("r.yaml", &traffic_rules(&up, up.addr));
    rules.write(
        "more.yml",
        "sources:\n  t: {path: /im/tencent, dialect: tencent, app_ids: ['1400000000']}\n",
    );
    let gw = Gateway::start(rules.path());
    let resp = client()
        .get(gw.admin_url("/admin/rules"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let state: serde_json::Value = resp.json().await.unwrap();

    assert_eq!(state["generation"], 1, "{state}");
    let loaded_at = humantime::parse_rfc3339(state["loaded_at"].as_str().expect("loaded_at"))
        .unwrap_or_else(|e| panic!("loaded_at is not RFC 3339 ({e}): {state}"));
    let age = SystemTime::now()
        .duration_since(loaded_at)
        .unwrap_or_default();
    assert!(age < Duration::from_secs(60), "loaded {age:?} ago");

    let mut files: Vec<&str> = state["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "{state}");
    assert!(
        files[0].ends_with("more.yml") && files[1].ends_with("r.yaml"),
        "{files:?}"
    );

    let names = |key: &str| -> Vec<String> {
        let mut v: Vec<String> = state[key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key}: {state}"))
            .iter()
            .map(|x| x["name"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("sources"), ["g", "t"]);
    assert_eq!(names("targets"), ["down", "up"]);
    assert_eq!(names("routes"), ["broken", "to-down", "to-up"]);
    let g = state["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "g")
        .unwrap();
    assert_eq!(g["path"], "/hooks/g");
    assert_eq!(g["dialect"], "generic");
    let to_up = state["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "to-up")
        .unwrap();
    assert_eq!(to_up["to"], serde_json::json!(["up"]));
    assert!(state["last_reload_error"].is_null(), "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_is_not_the_ingress() {
    let up = Sink::start().await;
    let rules = RulesDir::new();
    rules.write("r.yaml", &traffic_rules(&up, up.addr));
    let gw = Gateway::start(rules.path());
    assert_ne!(gw.admin.port(), gw.ingress.port());

    // Unknown admin paths are 404.
    for path in ["/nope", "/admin", "/admin/rules/x", "/hooks/g"] {
        let r = get(&gw.admin_url(path)).await;
        assert_eq!(r.status, 404, "admin {path}: {r:?}");
    }
    // The admin API only reads.
    let r = send("POST", &gw.admin_url("/admin/rules"), &[], "{}").await;
    assert_eq!(r.status, 405, "{r:?}");
    // Callbacks are not received on the admin port.
    let r = post_json(&gw.admin_url("/hooks/g"), r#"{"type":"ping"}"#).await;
    assert_ne!(r.status, 200, "{r:?}");

    // None of the admin endpoints is on the public ingress.
    for path in ["/metrics", "/healthz", "/readyz", "/admin/rules"] {
        let r = get(&gw.url(path)).await;
        assert_eq!(r.status, 404, "ingress {path}: {r:?}");
        assert!(
            !r.body.contains("switchyard_"),
            "ingress {path} leaks metrics"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(up.count(), 0, "nothing was delivered");
}
