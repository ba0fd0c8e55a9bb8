//! SPEC §5 deliveries, as the downstream service and the operator observe them: the request a
//! target receives (headers, signature, URL, body), fan-out, retries, isolation between targets,
//! backpressure, and graceful shutdown.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use support::*;

const GENERIC: &str = "sources:\n  g: {path: /hooks/g, dialect: generic, command: body.type}\n";
const FAST_RETRY: &str = "{max_attempts: 5, backoff: 50ms, max_backoff: 200ms}";

/// The secret of the signed target: `whsec_` + base64 of the key.
const KEY: &[u8] = b"switchyard-test-signing-key-0123";

fn secret() -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(KEY)
    )
}

/// HMAC-SHA256 (RFC 2104) written out over SHA-256, independent of the gateway's code.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    inner.update(message);
    let inner = inner.finalize();
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner);
    outer.finalize().into()
}

/// Verifies a Standard Webhooks request the way a receiver does: the secret `whsec_<base64>`,
/// the signed content `{id}.{timestamp}.{body}`, and any of the space-separated `v1,` signatures.
fn verify_standard_webhook(
    secret: &str,
    id: &str,
    timestamp: &str,
    body: &[u8],
    header: &str,
) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let Some(key) = secret
        .strip_prefix("whsec_")
        .and_then(|k| b64.decode(k).ok())
    else {
        return false;
    };
    let mut content = format!("{id}.{timestamp}.").into_bytes();
    content.extend_from_slice(body);
    let expected = b64.encode(hmac_sha256(&key, &content));
    header
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .any(|sig| sig == expected)
}

/// The verifier above is itself right: the Standard Webhooks specification's example.
#[test]
fn the_test_verifier_accepts_the_specification_example_and_nothing_else() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (id, ts, body) = (
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "1614265330",
        br#"{"test": 2432232314}"#,
    );
    let sig = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    assert!(verify_standard_webhook(secret, id, ts, body, sig));
    assert!(verify_standard_webhook(
        secret,
        id,
        ts,
        body,
        &format!("v1,bogus {sig}")
    ));
    assert!(!verify_standard_webhook(
        secret,
        id,
        "1614265331",
        body,
        sig
    ));
    assert!(!verify_standard_webhook(
        secret,
        id,
        ts,
        br#"{"test": 2432232315}"#,
        sig
    ));
    assert!(!verify_standard_webhook(secret, "msg_other", ts, body, sig));
}

async fn deliveries_metric(gw: &Gateway, route: &str, target: &str, outcome: &str) -> f64 {
    gw.metric(&format!(
        "switchyard_deliveries_total{{route=\"{route}\",target=\"{target}\",outcome=\"{outcome}\"}}"
    ))
    .await
}

/// The `event_id` of a generic acknowledgement.
fn acked_event_id(reply: &Reply) -> String {
    assert_eq!(reply.status, 200, "{reply:?}");
    let ack = reply.json();
    assert_eq!(ack["ok"], true, "{ack}");
    ack["event_id"].as_str().expect("event_id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_signature_url_and_body_as_the_target_receives_them() {
    let signed = Sink::start().await;
    let plain = Sink::start().await;
    let shaped = Sink::start().await;
    // The signed target fails twice before it accepts: three attempts of one delivery.
    signed.script(vec![Answer::status(503), Answer::status(503)]);
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            "{GENERIC}targets:
  signed:
    url: '{signed}/in/{{source}}/{{route}}/{{command}}?c={{command}}'
    method: PUT
    headers: {{Authorization: 'Bearer ${{TEST_DOWNSTREAM_TOKEN}}', X-Static: fixed}}
    signing_secret: {secret}
    retry: {FAST_RETRY}
  plain:
    url: '{plain}/plain'
  shaped:
    url: '{shaped}/shaped'
routes:
  - name: main-route
    to: [signed, plain]
  - name: shaped-route
    transform: '#{{kind: body.type, n: body.n}}'
    to: [shaped]
",
            signed = signed.url(),
            plain = plain.url(),
            shaped = shaped.url(),
            secret = secret(),
        ),
    );
    let gw = Gateway::start_with(
        rules.path(),
        &[],
        &[("TEST_DOWNSTREAM_TOKEN", "s3cret-from-env")],
    );

    // Odd spacing, key order and number formats: an untransformed body must arrive byte for byte.
    let body = "{ \"type\" : \"order paid/v2\",\"n\":1.50,  \"z\":1e3, \"a\":[ 2,1 ] }";
    let content_type = "application/vnd.shop+json; charset=utf-8";
    let sent_at = now_secs();
    let reply = send(
        "POST",
        &gw.url("/hooks/g"),
        &[("content-type", content_type)],
        body.to_string(),
    )
    .await;
    let event_id = acked_event_id(&reply);

    let got = signed.wait_for(3, Duration::from_secs(10)).await;
    let plain_got = plain.wait_for(1, Duration::from_secs(5)).await;
    let shaped_got = shaped.wait_for(1, Duration::from_secs(5)).await;

    // Every attempt of the signed delivery.
    let id = got[0].header("webhook-id").to_string();
    assert!(!id.is_empty(), "no webhook-id: {:?}", got[0].headers);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.method, "PUT");
        assert_eq!(
            r.uri, "/in/g/main-route/order%20paid%2Fv2?c=order%20paid%2Fv2",
            "placeholders are filled in and URL-encoded"
        );
        assert_eq!(r.header("authorization"), "Bearer s3cret-from-env");
        assert_eq!(r.header("x-static"), "fixed");
        assert_eq!(r.header("content-type"), content_type);
        assert_eq!(r.body, body.as_bytes(), "the original bytes");
        assert_eq!(r.header("webhook-id"), id, "the same id on every attempt");
        assert_eq!(r.header("x-switchyard-attempt"), (i + 1).to_string());
        assert_eq!(r.header("x-switchyard-event"), event_id);
        assert_eq!(r.header("x-switchyard-source"), "g");
        assert_eq!(r.header("x-switchyard-command"), "order paid/v2");
        assert_eq!(r.header("x-switchyard-route"), "main-route");
        let ts = r.header("webhook-timestamp");
        let secs: u64 = ts.parse().unwrap_or_else(|_| panic!("timestamp {ts:?}"));
        assert!(
            secs + 5 >= sent_at && secs <= now_secs() + 5,
            "webhook-timestamp {secs} is not unix seconds of now ({sent_at})"
        );
        let sig = r.header("webhook-signature");
        assert!(
            verify_standard_webhook(&secret(), &id, ts, &r.body, sig),
            "attempt {} signature {sig:?} does not verify",
            i + 1
        );
        // A receiver rejects the same signature over a different body or with another secret.
        assert!(!verify_standard_webhook(&secret(), &id, ts, b"{}", sig));
        assert!(!verify_standard_webhook(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            &id,
            ts,
            &r.body,
            sig
        ));
    }

    // The other delivery of the same callback: its own id, no signature, default method.
    let p = &plain_got[0];
    assert_eq!(p.method, "POST");
    assert_eq!(p.uri, "/plain");
    assert_ne!(p.header("webhook-id"), "");
    assert_ne!(p.header("webhook-id"), id, "each delivery has its own id");
    assert!(
        p.headers.get("webhook-signature").is_none(),
        "unsigned target got a signature"
    );
    assert!(p.headers.get("authorization").is_none());
    assert_eq!(p.header("x-switchyard-event"), event_id);
    assert_eq!(p.header("x-switchyard-attempt"), "1");
    assert_eq!(p.header("content-type"), content_type);
    assert_eq!(p.body, body.as_bytes());
    assert_eq!(
        p.header("user-agent"),
        concat!("switchyard/", env!("CARGO_PKG_VERSION"))
    );
    assert!(
        p.header("host").starts_with("127.0.0.1:"),
        "{:?}",
        p.header("host")
    );
    assert_eq!(p.header("content-length"), body.len().to_string());

    // The transformed delivery is JSON.
    let s = &shaped_got[0];
    assert_eq!(s.header("content-type"), "application/json");
    assert_eq!(
        s.json(),
        serde_json::json!({"kind": "order paid/v2", "n": 1.5})
    );
    assert_eq!(s.header("x-switchyard-route"), "shaped-route");
    assert_eq!(s.header("x-switchyard-event"), event_id);
    let ids: BTreeSet<&str> = [&got[0], p, s]
        .iter()
        .map(|r| r.header("webhook-id"))
        .collect();
    assert_eq!(ids.len(), 3, "three deliveries, three ids");

    eventually(Duration::from_secs(5), "delivered counted", || async {
        deliveries_metric(&gw, "main-route", "signed", "delivered").await == 1.0
    })
    .await;
    assert_eq!(
        deliveries_metric(&gw, "main-route", "signed", "retry").await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_callback_fans_out_over_routes_and_targets() {
    let (a, b, c) = (
        Sink::start().await,
        Sink::start().await,
        Sink::start().await,
    );
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            "{GENERIC}targets:
  a: {{url: '{}/a'}}
  b: {{url: '{}/b'}}
  c: {{url: '{}/c'}}
routes:
  - {{name: first, to: [a, b]}}
  - {{name: second, commands: ['order.*'], to: [b, c]}}
  - {{name: never, commands: ['user.*'], to: [a, b, c]}}
",
            a.url(),
            b.url(),
            c.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    let body = r#"{"type":"order.paid","id":7}"#;
    let event_id = acked_event_id(&post_json(&gw.url("/hooks/g"), body).await);

    let got_a = a.wait_for(1, Duration::from_secs(5)).await;
    let got_b = b.wait_for(2, Duration::from_secs(5)).await;
    let got_c = c.wait_for(1, Duration::from_secs(5)).await;
    // Nothing more arrives (the `never` route does not match).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((a.count(), b.count(), c.count()), (1, 2, 1));

    let all: Vec<&Received> = got_a.iter().chain(&got_b).chain(&got_c).collect();
    for r in &all {
        assert_eq!(r.body, body.as_bytes());
        assert_eq!(r.header("x-switchyard-event"), event_id);
    }
    assert_eq!(got_a[0].header("x-switchyard-route"), "first");
    assert_eq!(got_c[0].header("x-switchyard-route"), "second");
    let b_routes: BTreeSet<&str> = got_b
        .iter()
        .map(|r| r.header("x-switchyard-route"))
        .collect();
    assert_eq!(b_routes, BTreeSet::from(["first", "second"]));
    let ids: BTreeSet<&str> = all.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(ids.len(), 4, "every (route, target) is its own delivery");
}

/// Rules with one target `t` at `url` and one route `r` to it.
fn one_target(url: &str, target_extra: &str) -> String {
    format!("{GENERIC}targets:\n  t: {{url: '{url}', {target_extra}}}\nroutes:\n  - {{name: r, to: [t]}}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_408_are_retried_until_delivered() {
    // With either spool: a retry wakes its target when it falls due.
    for spool in ["redb", "memory"] {
        let sink = Sink::start().await;
        sink.script(vec![
            Answer::status(500),
            Answer::status(503),
            Answer::status(408),
        ]);
        let rules = RulesDir::new();
        rules.write(
            "r.yaml",
            &one_target(&sink.url(), &format!("retry: {FAST_RETRY}")),
        );
        let gw = Gateway::start_with(rules.path(), &["--spool", spool], &[]);
        acked_event_id(&post_json(&gw.url("/hooks/g"), r#"{"type":"x"}"#).await);

        let got = sink.wait_for(4, Duration::from_secs(10)).await;
        let attempts: Vec<&str> = got
            .iter()
            .map(|r| r.header("x-switchyard-attempt"))
            .collect();
        assert_eq!(attempts, ["1", "2", "3", "4"], "{spool}");
        assert!(got
            .iter()
            .all(|r| r.header("webhook-id") == got[0].header("webhook-id")));
        eventually(Duration::from_secs(5), "delivered counted", || async {
            deliveries_metric(&gw, "r", "t", "delivered").await == 1.0
        })
        .await;
        assert_eq!(deliveries_metric(&gw, "r", "t", "retry").await, 3.0);
        assert_eq!(deliveries_metric(&gw, "r", "t", "failed").await, 0.0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sink.count(), 4, "{spool}: nothing is sent after the 2xx");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_times_out_is_retried() {
    // With either spool: the retry is due after the target's scheduler last looked.
    for spool in ["redb", "memory"] {
        let sink = Sink::start().await;
        sink.script(vec![Answer::status(200).delayed(Duration::from_secs(3))]);
        let rules = RulesDir::new();
        rules.write(
            "r.yaml",
            &one_target(&sink.url(), &format!("timeout: 300ms, retry: {FAST_RETRY}")),
        );
        let gw = Gateway::start_with(rules.path(), &["--spool", spool], &[]);
        acked_event_id(&post_json(&gw.url("/hooks/g"), r#"{"type":"x"}"#).await);
        let got = sink.wait_for(2, Duration::from_secs(10)).await;
        assert_eq!(got[1].header("x-switchyard-attempt"), "2", "{spool}");
        assert_eq!(got[1].header("webhook-id"), got[0].header("webhook-id"));
        assert!(
            got[1].at - got[0].at < Duration::from_secs(2),
            "{spool}: the retry came {:?} after the first attempt",
            got[1].at - got[0].at
        );
        eventually(Duration::from_secs(5), "delivered counted", || async {
            deliveries_metric(&gw, "r", "t", "delivered").await == 1.0
        })
        .await;
        gw.wait_for_log("timed out", Duration::from_secs(1)).await;
        sink.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_on_429_is_honoured() {
    let sink = Sink::start().await;
    sink.script(vec![Answer::status(429).header("retry-after", "1")]);
    let rules = RulesDir::new();
    // The backoff alone would retry within 50ms; Retry-After asks for a second (max_backoff
    // bounds how long a target may ask for, so it is above one second here).
    rules.write(
        "r.yaml",
        &one_target(
            &sink.url(),
            "retry: {max_attempts: 5, backoff: 50ms, max_backoff: 5s}",
        ),
    );
    let gw = Gateway::start(rules.path());
    acked_event_id(&post_json(&gw.url("/hooks/g"), r#"{"type":"x"}"#).await);
    let got = sink.wait_for(2, Duration::from_secs(10)).await;
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= Duration::from_millis(900),
        "second attempt came {gap:?} after a 429 with Retry-After: 1"
    );
    assert_eq!(got[1].header("x-switchyard-attempt"), "2");
    eventually(Duration::from_secs(5), "delivered counted", || async {
        deliveries_metric(&gw, "r", "t", "delivered").await == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_not_retried() {
    let s400 = Sink::start().await;
    let s404 = Sink::start().await;
    s400.set_default(Answer::status(400).body("bad payload"));
    s404.set_default(Answer::status(404));
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            "{GENERIC}targets:
  t400: {{url: '{}/x', retry: {FAST_RETRY}}}
  t404: {{url: '{}/x', retry: {FAST_RETRY}}}
routes:
  - {{name: r, to: [t400, t404]}}
",
            s400.url(),
            s404.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    acked_event_id(&post_json(&gw.url("/hooks/g"), r#"{"type":"x"}"#).await);
    eventually(Duration::from_secs(5), "both deliveries failed", || async {
        deliveries_metric(&gw, "r", "t400", "failed").await == 1.0
            && deliveries_metric(&gw, "r", "t404", "failed").await == 1.0
    })
    .await;
    // Many backoff periods later, still one request each.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s400.count(), 1);
    assert_eq!(s404.count(), 1);
    assert_eq!(deliveries_metric(&gw, "r", "t400", "retry").await, 0.0);
    assert_eq!(deliveries_metric(&gw, "r", "t400", "delivered").await, 0.0);
    // Matched on the raw lines: the JSON log also has tracing's own `target` key (see report).
    let failed: Vec<String> = gw
        .logs()
        .into_iter()
        .filter(|l| l.contains(r#""message":"delivery failed; kept as a dead letter""#))
        .collect();
    assert_eq!(failed.len(), 2, "{failed:#?}");
    for (target, status) in [("t400", "HTTP 400"), ("t404", "HTTP 404")] {
        assert!(
            failed
                .iter()
                .any(|l| l.contains(&format!(r#""target":"{target}""#)) && l.contains(status)),
            "no failure of {target} with {status}: {failed:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_stop_at_max_attempts() {
    let sink = Sink::start().await;
    sink.set_default(Answer::status(503));
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &one_target(
            &sink.url(),
            "retry: {max_attempts: 3, backoff: 20ms, max_backoff: 100ms}",
        ),
    );
    let gw = Gateway::start(rules.path());
    acked_event_id(&post_json(&gw.url("/hooks/g"), r#"{"type":"x"}"#).await);
    eventually(Duration::from_secs(10), "the delivery failed", || async {
        deliveries_metric(&gw, "r", "t", "failed").await == 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = sink.received();
    let attempts: Vec<&str> = got
        .iter()
        .map(|r| r.header("x-switchyard-attempt"))
        .collect();
    assert_eq!(attempts, ["1", "2", "3"], "exactly max_attempts requests");
    assert_eq!(deliveries_metric(&gw, "r", "t", "retry").await, 2.0);
    let line = gw
        .wait_for_log("delivery failed", Duration::from_secs(1))
        .await;
    assert!(line.contains("after 3 attempts"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_is_down_gets_its_delivery_when_it_comes_back() {
    let addr = Sink::down().await;
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &one_target(
            &format!("http://{addr}/back"),
            "retry: {max_attempts: 1000, backoff: 50ms, max_backoff: 200ms}",
        ),
    );
    let gw = Gateway::start(rules.path());
    let body = r#"{"type":"x","n":1}"#;
    acked_event_id(&post_json(&gw.url("/hooks/g"), body).await);
    // The connection is refused a few times…
    eventually(Duration::from_secs(10), "retries counted", || async {
        deliveries_metric(&gw, "r", "t", "retry").await >= 2.0
    })
    .await;
    let line = gw
        .wait_for_log("attempt failed, will retry", Duration::from_secs(1))
        .await;
    assert!(line.contains("connect"), "{line}");
    // …then the target is up again on the same port.
    let sink = Sink::restart_on(addr).await;
    let got = sink.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].body, body.as_bytes());
    assert_eq!(got[0].uri, "/back");
    let attempt: u32 = got[0].header("x-switchyard-attempt").parse().unwrap();
    assert!(attempt >= 3, "attempt {attempt}");
    eventually(Duration::from_secs(5), "delivered counted", || async {
        deliveries_metric(&gw, "r", "t", "delivered").await == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_target_does_not_delay_another() {
    let slow = Sink::start().await;
    let fast = Sink::start().await;
    slow.set_default(Answer::status(200).delayed(Duration::from_secs(3)));
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            "{GENERIC}targets:
  slow: {{url: '{}/slow', concurrency: 1}}
  fast: {{url: '{}/fast'}}
routes:
  - {{name: r, to: [slow, fast]}}
",
            slow.url(),
            fast.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    let sent = Instant::now();
    for i in 0..3 {
        acked_event_id(
            &post_json(&gw.url("/hooks/g"), &format!(r#"{{"type":"x","i":{i}}}"#)).await,
        );
    }
    let got = fast.wait_for(3, Duration::from_secs(10)).await;
    // The slow target has one request in flight and two queued behind it (9 s of work), and
    // has not answered even its first: the fast target got all three regardless.
    let first_slow = slow.wait_for(1, Duration::from_secs(5)).await[0].at;
    for r in &got {
        assert!(
            r.at < first_slow + Duration::from_secs(3),
            "the fast target waited for the slow one ({:?} after sending)",
            r.at - sent
        );
    }
    assert_eq!(slow.count(), 1, "concurrency 1: one request in flight");
    slow.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_target_concurrency_is_respected() {
    const HOLD: Duration = Duration::from_millis(500);
    let sink = Sink::start().await;
    sink.set_default(Answer::status(200).delayed(HOLD));
    let rules = RulesDir::new();
    // Six routes to one target: one callback queues six deliveries at once.
    let routes: String = (1..=6)
        .map(|i| format!("  - {{name: r{i}, to: [t]}}\n"))
        .collect();
    rules.write(
        "r.yaml",
        &format!(
            "{GENERIC}targets:\n  t: {{url: '{}/x', concurrency: 2}}\nroutes:\n{routes}",
            sink.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    acked_event_id(&post_json(&gw.url("/hooks/g"), r#"{"type":"x"}"#).await);
    let got = sink.wait_for(6, Duration::from_secs(10)).await;
    // Each request is in flight at least from its arrival to arrival + HOLD; three of those
    // windows overlapping would mean three requests in flight at once.
    let mut at: Vec<Instant> = got.iter().map(|r| r.at).collect();
    at.sort();
    for w in at.windows(3) {
        assert!(
            w[2] - w[0] >= HOLD,
            "three requests in flight at once: arrivals {:?} apart",
            w[2] - w[0]
        );
    }
    // And both slots are used: some two requests overlap.
    assert!(
        at.windows(2).any(|w| w[1] - w[0] < HOLD),
        "requests were sent one at a time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_and_loses_nothing_it_acknowledged() {
    let addr = Sink::down().await;
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            "sources:
  g: {{path: /hooks/g, dialect: generic, command: body.type}}
  t: {{path: /im/tencent, dialect: tencent, app_ids: ['{APP_ID}']}}
  o: {{path: /im/openim, dialect: openim}}
targets:
  t: {{url: 'http://{addr}/x', retry: {{max_attempts: 1000, backoff: 50ms, max_backoff: 200ms}}}}
routes:
  - {{name: r, to: [t]}}
"
        ),
    );
    let gw = Gateway::start_with(rules.path(), &["--max-spool", "2KiB"], &[]);
    let mut acked = BTreeSet::new();
    let mut refused = None;
    for i in 0..50 {
        let reply = post_json(
            &gw.url("/hooks/g"),
            &format!(r#"{{"type":"x","i":{i},"pad":"{}"}}"#, "p".repeat(60)),
        )
        .await;
        match reply.status {
            200 => {
                acked.insert(i);
            }
            503 => {
                refused = Some(reply);
                break;
            }
            other => panic!("unexpected {other}: {reply:?}"),
        }
    }
    let refused = refused.expect("a 2 KiB queue never filled up");
    assert!(!acked.is_empty());
    let err = refused.json();
    assert_eq!(err["ok"], false, "{err}");
    assert!(!err["error"].as_str().unwrap().is_empty(), "{err}");

    // The other dialects answer 503 in their own shapes.
    let big = format!(r#"{{"CallbackCommand":"x","pad":"{}"}}"#, "p".repeat(400));
    let tencent = post_json(
        &gw.url(&format!(
            "/im/tencent?{}",
            tencent_query("State.StateChange", None)
        )),
        &big,
    )
    .await;
    assert_eq!(tencent.status, 503, "{tencent:?}");
    let t = tencent.json();
    assert_eq!(t["ActionStatus"], "FAIL", "{t}");
    assert_eq!(t["ErrorCode"], 1, "{t}");
    assert!(!t["ErrorInfo"].as_str().unwrap().is_empty(), "{t}");
    let openim = post_json(
        &gw.url("/im/openim/callbackAfterSendSingleMsgCommand"),
        &big,
    )
    .await;
    assert_eq!(openim.status, 503, "{openim:?}");
    let o = openim.json();
    assert_eq!(o["actionCode"], 1, "{o}");
    assert_eq!(o["errCode"], 503, "{o}");
    assert!(!o["errMsg"].as_str().unwrap().is_empty(), "{o}");

    // The target comes back: every acknowledged callback is delivered, nothing else.
    let sink = Sink::restart_on(addr).await;
    sink.wait_for(acked.len(), Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got: Vec<i64> = sink
        .received()
        .iter()
        .map(|r| r.json()["i"].as_i64().expect("a generic callback"))
        .collect();
    let delivered: BTreeSet<i64> = got.iter().copied().collect();
    assert_eq!(got.len(), delivered.len(), "duplicates: {got:?}");
    assert_eq!(delivered, acked.iter().map(|&i| i as i64).collect());

    // And the queue has room again.
    let reply = post_json(&gw.url("/hooks/g"), r#"{"type":"x","i":1000}"#).await;
    assert_eq!(reply.status, 200, "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acknowledgement_never_waits_for_the_target() {
    let sink = Sink::start().await;
    sink.set_default(Answer::status(200).delayed(Duration::from_secs(5)));
    let rules = RulesDir::new();
    rules.write("r.yaml", &one_target(&sink.url(), ""));
    let gw = Gateway::start(rules.path());
    for i in 0..3 {
        let started = Instant::now();
        let reply = post_json(&gw.url("/hooks/g"), &format!(r#"{{"type":"x","i":{i}}}"#)).await;
        let took = started.elapsed();
        acked_event_id(&reply);
        assert!(
            took < Duration::from_millis(2500),
            "the acknowledgement took {took:?} with a target that hangs 5 s"
        );
    }
    // The target really was hanging on them.
    sink.wait_for(3, Duration::from_secs(5)).await;
    assert_eq!(deliveries_metric(&gw, "r", "t", "delivered").await, 0.0);
    sink.stop();
}

async fn refused(addr: SocketAddr) -> bool {
    matches!(
        tokio::net::TcpStream::connect(addr).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_attempt_in_flight_finish() {
    const HOLD: Duration = Duration::from_secs(2);
    let sink = Sink::start().await;
    sink.set_default(Answer::status(200).delayed(HOLD));
    let rules = RulesDir::new();
    rules.write("r.yaml", &one_target(&sink.url(), ""));
    let mut gw = Gateway::start(rules.path());
    let ingress = gw.ingress;
    acked_event_id(&post_json(&gw.url("/hooks/g"), r#"{"type":"x"}"#).await);
    let got = sink.wait_for(1, Duration::from_secs(5)).await;
    let delivery_id = got[0].header("webhook-id").to_string();

    gw.signal("TERM");
    // New connections are refused at once, while the attempt is still in flight…
    eventually(
        Duration::from_secs(1),
        "the ingress refuses connections",
        || refused(ingress),
    )
    .await;
    assert!(
        gw.exited().is_none(),
        "the gateway exited with an attempt in flight"
    );
    // …and the gateway exits cleanly only after the target answered.
    let (status, logs) = gw.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
    assert!(
        got[0].at.elapsed() >= HOLD,
        "exited {:?} after the attempt began, before the target answered",
        got[0].at.elapsed()
    );
    let delivered = parse_log(&logs)
        .into_iter()
        .any(|l| l["message"] == "delivered" && l["delivery_id"] == delivery_id.as_str());
    assert!(
        delivered,
        "no `delivered` log for {delivery_id}:\n{}",
        logs.join("\n")
    );
    assert_eq!(sink.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_callback_being_received_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sink = Sink::start().await;
    let rules = RulesDir::new();
    rules.write("r.yaml", &one_target(&sink.url(), ""));
    let gw = Gateway::start(rules.path());
    let body = r#"{"type":"x","half":"one","other":"two"}"#;
    let (first, rest) = body.split_at(20);
    let mut conn = tokio::net::TcpStream::connect(gw.ingress).await.unwrap();
    conn.write_all(
        format!(
            "POST /hooks/g HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{first}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut answer))
        .await
        .expect("no answer")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""ok":true"#), "{answer}");
    let (status, _) = gw.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
}

/// The gateway's threads by name, counted from /proc.
#[cfg(target_os = "linux")]
fn threads_named(pid: u32) -> std::collections::BTreeMap<String, usize> {
    let mut names = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let comm = std::fs::read_to_string(task.unwrap().path().join("comm")).unwrap_or_default();
        *names.entry(comm.trim().to_string()).or_insert(0) += 1;
    }
    names
}

/// `--workers N` gives N threads that answer and N that deliver; the default is half the cores,
/// rounded up; and a gateway with a single worker of each still answers and delivers.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sets_the_threads_that_answer_and_that_deliver() {
    let sink = Sink::start().await;
    let rules = RulesDir::new();
    rules.write("r.yaml", &one_target(&sink.url(), "concurrency: 4"));
    let cores = std::thread::available_parallelism().unwrap().get();
    for (args, expected) in [
        (vec!["--workers", "3"], 3),
        (vec!["--workers", "1"], 1),
        (vec![], cores.div_ceil(2)),
    ] {
        let gw = Gateway::start_with(rules.path(), &args, &[]);
        let started = gw
            .wait_for_log("switchyard started", Duration::from_secs(5))
            .await;
        let started: serde_json::Value = serde_json::from_str(&started).unwrap();
        assert_eq!(started["workers"], expected as u64, "{args:?}");
        // A thread is named by itself once it runs: on a busy machine some may not be yet.
        let deadline = Instant::now() + Duration::from_secs(5);
        let threads = loop {
            let threads = threads_named(gw.pid());
            let named = threads.get("delivery") == Some(&expected)
                && threads.get("tokio-rt-worker") >= Some(&expected);
            if named || Instant::now() > deadline {
                break threads;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(
            threads.get("delivery"),
            Some(&expected),
            "{args:?}: {threads:?}"
        );
        // The ingress's runtime names its workers and its blocking helpers alike; the sweep of
        // expired dead letters at start may have left one of the latter.
        let ingress = threads.get("tokio-rt-worker").copied().unwrap_or(0);
        assert!(
            (expected..=expected + 1).contains(&ingress),
            "{args:?}: {threads:?}"
        );

        let before = sink.count();
        for i in 0..20 {
            let body = format!(r#"{{"type":"t","n":{i}}}"#);
            acked_event_id(&post_json(&gw.url("/hooks/g"), &body).await);
        }
        sink.wait_for(before + 20, Duration::from_secs(5)).await;
        gw.stop();
    }
}

#[test]
fn workers_must_be_a_positive_number() {
    for bad in ["0", "-1", "many"] {
        let (code, _, stderr) = run_cli(&["serve", &format!("--workers={bad}")], None);
        assert_eq!(code, 2, "--workers {bad}: {stderr}");
        assert!(stderr.contains("--workers"), "--workers {bad}: {stderr}");
    }
}

/// The counters a dashboard reads, by route, from one target's lane that stays open across a
/// reload renaming one of the routes: each series counts its own callbacks, and the new name's
/// series starts at one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_and_callbacks_are_counted_by_their_own_labels_across_a_reload() {
    let sink = Sink::start().await;
    let rules = RulesDir::new();
    let write = |first: &str| {
        rules.write(
            "r.yaml",
            &format!(
                "{GENERIC}targets:\n  t: {{url: '{}', concurrency: 1}}\nroutes:\n  \
                 - {{name: {first}, commands: [join], to: [t]}}\n  \
                 - {{name: b, commands: [leave], to: [t]}}\n",
                sink.url()
            ),
        );
    };
    write("a");
    let gw = Gateway::start(rules.path());
    let url = gw.url("/hooks/g");
    for body in [
        r#"{"type":"join"}"#,
        r#"{"type":"leave"}"#,
        r#"{"type":"join"}"#,
    ] {
        acked_event_id(&post_json(&url, body).await);
    }
    sink.wait_for(3, Duration::from_secs(10)).await;
    eventually(
        Duration::from_secs(5),
        "three deliveries counted",
        || async {
            deliveries_metric(&gw, "a", "t", "delivered").await
                + deliveries_metric(&gw, "b", "t", "delivered").await
                == 3.0
        },
    )
    .await;
    assert_eq!(deliveries_metric(&gw, "a", "t", "delivered").await, 2.0);
    assert_eq!(deliveries_metric(&gw, "b", "t", "delivered").await, 1.0);
    let callbacks = |command: &'static str| {
        let gw = &gw;
        async move {
            gw.metric(&format!(
                "switchyard_callbacks_total{{source=\"g\",command=\"{command}\",outcome=\"routed\"}}"
            ))
            .await
        }
    };
    assert_eq!(callbacks("join").await, 2.0);
    assert_eq!(callbacks("leave").await, 1.0);
    assert_eq!(
        gw.metric(r#"switchyard_ack_duration_seconds_count{source="g"}"#)
            .await,
        3.0
    );

    let before = gw.admin_json("/admin/rules").await["generation"]
        .as_u64()
        .expect("generation");
    write("a2");
    eventually(Duration::from_secs(10), "the reload", || async {
        gw.admin_json("/admin/rules").await["generation"].as_u64() > Some(before)
    })
    .await;
    acked_event_id(&post_json(&url, r#"{"type":"join"}"#).await);
    sink.wait_for(4, Duration::from_secs(10)).await;
    eventually(
        Duration::from_secs(5),
        "the renamed route counted",
        || async { deliveries_metric(&gw, "a2", "t", "delivered").await == 1.0 },
    )
    .await;
    assert_eq!(deliveries_metric(&gw, "a", "t", "delivered").await, 2.0);
    assert_eq!(deliveries_metric(&gw, "b", "t", "delivered").await, 1.0);
    assert_eq!(callbacks("join").await, 3.0);
    assert_eq!(
        gw.metric(r#"switchyard_delivery_duration_seconds_count{target="t"}"#)
            .await,
        4.0
    );
}
