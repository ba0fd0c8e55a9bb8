//! SPEC §8 synchronous routes, as the IM server and the moderation service observe them: the
//! answer relayed (as is, or through a response_transform), the fallback on every kind of
//! failure in both dialects, the bound on the wait, and the other routes' durable copies.

mod support;

use std::time::{Duration, Instant};

use support::*;

const TENCENT_OK: &str = r#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}"#;
const OPENIM_OK: &str = r#"{"actionCode":0,"errCode":0,"errMsg":"","errDlt":"","nextCode":0}"#;

fn rules(moderation: &str, audit: &str, tencent_extra: &str, route_extra: &str) -> RulesDir {
    let dir = RulesDir::new();
    dir.write(
        "r.yaml",
        &format!(
            "sources:
  t: {{path: /im/tencent, dialect: tencent, app_ids: ['{APP_ID}'], token: {TOKEN}{tencent_extra}}}
  o: {{path: /im/openim, dialect: openim, respond_timeout: 300ms}}
targets:
  moderation: {{url: '{moderation}/check', retry: {{max_attempts: 2, backoff: 50ms}}}}
  audit: {{url: '{audit}/audit'}}
routes:
  - name: moderate
    commands: ['*BeforeSendMsg', 'callbackBefore*']
    respond: true
    to: [moderation]
{route_extra}
  - name: audit-log
    to: [audit]
"
        ),
    );
    dir
}

fn before_send() -> String {
    sample("tencent/Group.CallbackBeforeSendMsg.json")
}

async fn post_tencent(gw: &Gateway, body: &str) -> (Reply, Duration) {
    let started = Instant::now();
    let q = tencent_query("Group.CallbackBeforeSendMsg", Some(TOKEN));
    let reply = post_json(&gw.url(&format!("/im/tencent?{q}")), body).await;
    (reply, started.elapsed())
}

const OPENIM_BEFORE: &str = r#"{"callbackCommand":"callbackBeforeSendSingleMsgCommand","sendID":"u1","recvID":"u2","contentType":101,"content":"{\"content\":\"hi\"}"}"#;

async fn post_openim(gw: &Gateway) -> Reply {
    send(
        "POST",
        &gw.url("/im/openim/callbackBeforeSendSingleMsgCommand"),
        &[
            ("content-type", "application/json"),
            ("operationID", "op-1"),
        ],
        OPENIM_BEFORE.to_string(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_targets_answer_is_relayed_and_other_routes_get_their_copy() {
    let (moderation, audit) = (Sink::start().await, Sink::start().await);
    // A Tencent "replace the message" answer, exactly as the moderation service writes it.
    let answer = r#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"***"}}]}"#;
    moderation.set_default(Answer::status(200).body(answer));
    let dir = rules(&moderation.url(), &audit.url(), "", "");
    let gw = Gateway::start(dir.path());

    let (reply, _) = post_tencent(&gw, &before_send()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.body, answer,
        "the target's answer reaches the IM server byte for byte"
    );

    let asked = moderation.received();
    assert_eq!(asked.len(), 1, "the synchronous target is asked once");
    assert_eq!(&asked[0].body[..], before_send().as_bytes());
    assert_eq!(asked[0].uri, "/check");
    assert_eq!(asked[0].header("x-switchyard-route"), "moderate");
    assert_eq!(
        asked[0].header("x-switchyard-command"),
        "Group.CallbackBeforeSendMsg"
    );
    // The audit route's copy goes the durable way; the synchronous one is not queued again.
    let copies = audit.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(&copies[0].body[..], before_send().as_bytes());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(moderation.count(), 1, "no queued copy follows the answer");
    assert_eq!(
        gw.metric(r#"switchyard_deliveries_total{route="moderate",target="moderation",outcome="responded"}"#)
            .await,
        1.0
    );
    // A callback no respond route matches gets the plain acknowledgement.
    let q = tencent_query("Profile.CallbackPortraitSet", Some(TOKEN));
    let reply = post_json(
        &gw.url(&format!("/im/tencent?{q}")),
        &sample("tencent/Profile.CallbackPortraitSet.json"),
    )
    .await;
    assert_eq!(reply.body, TENCENT_OK);
    assert_eq!(moderation.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_transform_turns_a_moderation_verdict_into_the_dialects_answer() {
    let (moderation, audit) = (Sink::start().await, Sink::start().await);
    moderation.script(vec![
        Answer::status(200).body(r#"{"verdict":"block","reason":"spam"}"#),
        Answer::status(201).body(r#"{"verdict":"pass"}"#),
    ]);
    let transform = r#"    response_transform: |
      if response.verdict == "block" {
        #{ActionStatus: "OK", ErrorCode: 1, ErrorInfo: `${response.reason} from ${body.From_Account}`}
      } else {
        #{ActionStatus: "OK", ErrorCode: 0, ErrorInfo: "", Status: status, Command: command}
      }"#;
    let dir = rules(&moderation.url(), &audit.url(), "", transform);
    let gw = Gateway::start(dir.path());

    let (reply, _) = post_tencent(&gw, &before_send()).await;
    assert_eq!(
        reply.json(),
        serde_json::json!({"ActionStatus": "OK", "ErrorCode": 1, "ErrorInfo": "spam from jared"})
    );
    let (reply, _) = post_tencent(&gw, &before_send()).await;
    assert_eq!(
        reply.json(),
        serde_json::json!({"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": "", "Status": 201,
            "Command": "Group.CallbackBeforeSendMsg"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_target_is_cut_off_at_respond_timeout_and_deny_answers() {
    let (moderation, audit) = (Sink::start().await, Sink::start().await);
    moderation.set_default(
        Answer::status(200)
            .body(TENCENT_OK)
            .delayed(Duration::from_secs(3)),
    );
    let dir = rules(
        &moderation.url(),
        &audit.url(),
        ", respond_timeout: 250ms, on_respond_failure: deny",
        "",
    );
    let gw = Gateway::start(dir.path());

    let (reply, took) = post_tencent(&gw, &before_send()).await;
    assert_eq!(reply.status, 200);
    let answer = reply.json();
    assert_eq!(answer["ActionStatus"], "OK");
    assert_eq!(
        answer["ErrorCode"], 1,
        "deny is Tencent's ErrorCode 1: {answer}"
    );
    assert!(
        took >= Duration::from_millis(240) && took < Duration::from_millis(1500),
        "answered after {took:?}, not at the 250ms respond_timeout"
    );
    let line = gw
        .wait_for_log("fell back to on_respond_failure", Duration::from_secs(5))
        .await;
    assert!(line.contains("respond_timeout"), "{line}");
    assert!(line.contains("did not answer in time"), "{line}");
    assert_eq!(
        gw.metric(r#"switchyard_deliveries_total{route="moderate",target="moderation",outcome="respond_timeout"}"#)
            .await,
        1.0
    );
    // The durable copy of the other route is not held back by the synchronous failure.
    audit.wait_for(1, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_failure_falls_back_in_the_openim_dialect() {
    let (moderation, audit) = (Sink::start().await, Sink::start().await);
    moderation.script(vec![
        Answer::status(500).body(r#"{"error":"boom"}"#),
        Answer::status(200).body("<html>not json</html>"),
        Answer::status(200).body(r#"[1, 2]"#),
        Answer::status(200).body(r#"{"nextCode":1}"#),
    ]);
    let dir = rules(&moderation.url(), &audit.url(), "", "");
    let gw = Gateway::start(dir.path());

    // allow (the default) answers with OpenIM's plain OK for each failure.
    for _ in 0..3 {
        let reply = post_openim(&gw).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, OPENIM_OK);
    }
    let reply = post_openim(&gw).await;
    assert_eq!(reply.body, r#"{"nextCode":1}"#, "a good answer is relayed");
    assert_eq!(moderation.count(), 4);
    for outcome in ["respond_status", "respond_invalid"] {
        let n = gw
            .metric(&format!(
                r#"switchyard_deliveries_total{{route="moderate",target="moderation",outcome="{outcome}"}}"#
            ))
            .await;
        assert!(n >= 1.0, "{outcome}: {n}");
    }
    let logs = gw.logs().join("\n");
    assert!(logs.contains("HTTP 500"), "{logs}");
    assert!(logs.contains("not JSON"), "{logs}");
    assert!(logs.contains("not an object"), "{logs}");
    audit.wait_for(4, Duration::from_secs(10)).await;
}

/// An OpenIM source that denies on failure, a `moderate` route to `moderation` at `url` (with
/// `route_extra` lines), and more targets and routes.
fn openim_deny(url: &str, route_extra: &str, targets: &str, routes: &str) -> String {
    format!(
        "sources:
  o: {{path: /im/openim, dialect: openim, on_respond_failure: deny}}
targets:
  moderation: {{url: '{url}'}}
{targets}routes:
  - name: moderate
    commands: ['callbackBefore*']
    respond: true
{route_extra}    to: [moderation]
{routes}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_target_or_a_failing_script_answers_deny_in_openim() {
    let audit = Sink::start().await;
    let down = Sink::down().await;
    let dir = RulesDir::new();
    dir.write(
        "r.yaml",
        &openim_deny(
            &format!("http://{down}/check"),
            "",
            &format!("  audit: {{url: '{}/audit'}}\n", audit.url()),
            "  - name: audit-log\n    to: [audit]\n",
        ),
    );
    let gw = Gateway::start(dir.path());
    let reply = post_openim(&gw).await;
    let answer = reply.json();
    assert_eq!(
        answer["nextCode"], 1,
        "deny is OpenIM's nextCode 1: {answer}"
    );
    assert_eq!(answer["actionCode"], 0);
    assert_eq!(answer["errCode"], 5000);
    assert_eq!(
        gw.metric(r#"switchyard_deliveries_total{route="moderate",target="moderation",outcome="respond_unreachable"}"#)
            .await,
        1.0
    );
    audit.wait_for(1, Duration::from_secs(10)).await;

    // A response_transform that fails is a fallback too, counted as a script error.
    let moderation = Sink::start().await;
    moderation.set_default(Answer::status(200).body(r#"{"ok":true}"#));
    dir.write(
        "r.yaml",
        &openim_deny(
            &format!("{}/check", moderation.url()),
            "    response_transform: 'response.missing.field'\n",
            "",
            "",
        ),
    );
    gw.wait_for_log("rules reloaded", Duration::from_secs(10))
        .await;
    let reply = post_openim(&gw).await;
    assert_eq!(reply.json()["nextCode"], 1, "{}", reply.body);
    assert_eq!(moderation.count(), 1);
    assert_eq!(
        gw.metric(r#"switchyard_script_errors_total{route="moderate",stage="response_transform"}"#)
            .await,
        1.0
    );
    assert_eq!(
        gw.metric(r#"switchyard_deliveries_total{route="moderate",target="moderation",outcome="respond_script_error"}"#)
            .await,
        1.0
    );
}

#[test]
fn check_refuses_synchronous_routes_it_cannot_run() {
    let dir = RulesDir::new();
    dir.write(
        "r.yaml",
        "sources:
  t: {path: /t, dialect: tencent, respond_timeout: 5m, on_respond_failure: maybe}
targets:
  a: {url: 'http://127.0.0.1:9/a'}
  b: {url: 'http://127.0.0.1:9/b'}
routes:
  - name: two
    respond: true
    to: [a, b]
  - name: shaped
    response_transform: '#{}'
    to: [a]
  - name: typo
    respond: 'true'
    to: [a]
",
    );
    let (code, out, err) = run_cli(&["check", "--rules", dir.path().to_str().unwrap()], None);
    let err = format!("{out}{err}");
    assert_eq!(code, 1, "{err}");
    for needle in [
        "respond_timeout must be more than 0 and at most 60s",
        "on_respond_failure must be `allow` or `deny`, not `maybe`",
        "`to` must name exactly one target",
        "response_transform shapes a synchronous answer: it needs `respond: true`",
        "respond must be true or false",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    assert!(
        err.contains("r.yaml:2:"),
        "errors carry their location:\n{err}"
    );
}

/// The IM server gives up on the synchronous answer and closes the connection while the target
/// still thinks: the other routes' copies were stored, so they are delivered at once all the
/// same — not when some later callback or timer happens to wake their target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_copies_are_delivered_when_the_sender_hangs_up_before_the_answer() {
    for spool in ["redb", "memory"] {
        let (moderation, audit) = (Sink::start().await, Sink::start().await);
        moderation.set_default(
            Answer::status(200)
                .body(TENCENT_OK)
                .delayed(Duration::from_secs(10)),
        );
        let dir = rules(&moderation.url(), &audit.url(), ", respond_timeout: 8s", "");
        let gw = Gateway::start_with(dir.path(), &["--spool", spool], &[]);

        let impatient = reqwest::Client::builder()
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let q = tencent_query("Group.CallbackBeforeSendMsg", Some(TOKEN));
        let sent = Instant::now();
        let gave_up = impatient
            .post(gw.url(&format!("/im/tencent?{q}")))
            .header("content-type", "application/json")
            .body(before_send())
            .send()
            .await;
        assert!(gave_up.is_err(), "{spool}: the answer waits for the target");
        moderation.wait_for(1, Duration::from_secs(5)).await;
        let copies = audit.wait_for(1, Duration::from_secs(3)).await;
        assert_eq!(copies.len(), 1, "{spool}: the audit copy is delivered");
        assert!(
            sent.elapsed() < Duration::from_secs(3),
            "{spool}: delivered {:?} after the callback, not at once",
            sent.elapsed()
        );
        assert_eq!(
            copies[0].json(),
            serde_json::from_str::<serde_json::Value>(&before_send()).unwrap()
        );
    }
}
