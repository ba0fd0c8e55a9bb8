//! SPEC §4 (ingress, per dialect) and the script-failure rules of §3, as the IM server and the
//! downstream service observe them: statuses, exact answer bodies, what a sink received (or did
//! not), metrics and log lines.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const TENCENT_OK: &str = r#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}"#;
const OPENIM_OK: &str = r#"{"actionCode":0,"errCode":0,"errMsg":"","errDlt":"","nextCode":0}"#;
const WAIT: Duration = Duration::from_secs(5);

/// Sources of every dialect; one route sends everything to `{sink}/{source}/{command}`.
fn standard_rules(sink: &Sink) -> RulesDir {
    let rules = RulesDir::new();
    rules.write(
        "sources.yaml",
        &format!(
            r#"sources:
  t:  {{path: /im/tencent, dialect: tencent, app_ids: ['{APP_ID}'], token: {TOKEN}, max_body: 4KiB}}
  tn: {{path: /im/tencent-open, dialect: tencent, app_ids: ['{APP_ID}', '1400000009']}}
  o:  {{path: /im/openim, dialect: openim, max_body: 4KiB}}
  g:  {{path: /hooks/g, dialect: generic, command: body.meta.type, max_body: 4KiB}}
  gh: {{path: /hooks/gh, dialect: generic, command: header.x-event-type}}
  gq: {{path: /hooks/gq, dialect: generic, command: query.event}}
"#
        ),
    );
    rules.write(
        "routes.yaml",
        &format!(
            "targets:\n  s: {{url: '{}/{{source}}/{{command}}'}}\nroutes:\n  - {{name: all, to: [s]}}\n",
            sink.url()
        ),
    );
    rules
}

/// The sorted keys of a JSON object.
fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

fn assert_tencent_error(reply: &Reply, status: u16, mentions: &str) {
    assert_eq!(reply.status, status, "{reply:?}");
    let v = reply.json();
    assert_eq!(keys(&v), ["ActionStatus", "ErrorCode", "ErrorInfo"], "{v}");
    assert_eq!(v["ActionStatus"], "FAIL", "{v}");
    assert_eq!(v["ErrorCode"], 1, "{v}");
    let info = v["ErrorInfo"].as_str().unwrap();
    assert!(
        info.contains(mentions),
        "{info:?} should mention {mentions:?}"
    );
}

fn assert_openim_error(reply: &Reply, status: u16, mentions: &str) {
    assert_eq!(reply.status, status, "{reply:?}");
    let v = reply.json();
    assert_eq!(
        keys(&v),
        ["actionCode", "errCode", "errDlt", "errMsg", "nextCode"],
        "{v}"
    );
    assert_eq!(v["actionCode"], 1, "{v}");
    assert_eq!(v["errCode"], status, "{v}");
    assert_eq!(v["errDlt"], "", "{v}");
    assert_eq!(v["nextCode"], 0, "{v}");
    let msg = v["errMsg"].as_str().unwrap();
    assert!(
        msg.contains(mentions),
        "{msg:?} should mention {mentions:?}"
    );
}

fn assert_generic_error(reply: &Reply, status: u16, mentions: &str) {
    assert_eq!(reply.status, status, "{reply:?}");
    let v = reply.json();
    assert_eq!(keys(&v), ["error", "ok"], "{v}");
    assert_eq!(v["ok"], false, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains(mentions),
        "{msg:?} should mention {mentions:?}"
    );
}

#[derive(Clone, Copy, Debug)]
enum Shape {
    Tencent,
    OpenIm,
    Generic,
}

fn assert_error(shape: Shape, reply: &Reply, status: u16, mentions: &str) {
    match shape {
        Shape::Tencent => assert_tencent_error(reply, status, mentions),
        Shape::OpenIm => assert_openim_error(reply, status, mentions),
        Shape::Generic => assert_generic_error(reply, status, mentions),
    }
}

fn assert_ok(shape: Shape, reply: &Reply) {
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.headers["content-type"], "application/json",
        "{reply:?}"
    );
    match shape {
        Shape::Tencent => assert_eq!(reply.body, TENCENT_OK),
        Shape::OpenIm => assert_eq!(reply.body, OPENIM_OK),
        Shape::Generic => {
            let v = reply.json();
            assert_eq!(keys(&v), ["event_id", "ok"], "{v}");
            assert_eq!(v["ok"], true);
            assert!(!v["event_id"].as_str().unwrap().is_empty());
        }
    }
}

/// Sends a valid generic callback and waits for it: whatever an earlier request would have
/// queued has had its chance to arrive. Then the sink must hold the barrier and nothing else.
async fn assert_only_barrier_delivered(gw: &Gateway, sink: &Sink) {
    let reply = post_json(&gw.url("/hooks/g"), r#"{"meta":{"type":"barrier"}}"#).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    sink.wait_for(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = sink.received();
    assert_eq!(
        got.iter().map(|r| r.uri.as_str()).collect::<Vec<_>>(),
        ["/g/barrier"],
        "a rejected request was delivered"
    );
}

fn callbacks(source: &str, command: &str, outcome: &str) -> String {
    format!(
        "switchyard_callbacks_total{{source=\"{source}\",command=\"{command}\",outcome=\"{outcome}\"}}"
    )
}

fn script_errors(route: &str, stage: &str) -> String {
    format!("switchyard_script_errors_total{{route=\"{route}\",stage=\"{stage}\"}}")
}

/// `SdkAppid=…&CallbackCommand=…` plus a Sign of `token` for `time`.
fn signed_query(command: &str, time: u64, token: &str) -> String {
    let t = time.to_string();
    format!(
        "SdkAppid={APP_ID}&CallbackCommand={command}&contenttype=json&ClientIP=127.0.0.1&OptPlatform=RESTAPI&Sign={}&RequestTime={t}",
        switchyard::dialect::tencent::sign(token, &t)
    )
}

// ---------------------------------------------------------------------------------------------
// tencent

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tencent_sdkappid_must_be_present_and_listed() {
    let sink = Sink::start().await;
    let rules = standard_rules(&sink);
    let gw = Gateway::start(rules.path());
    let body = sample("tencent/Profile.CallbackPortraitSet.json");
    let t = now_secs().to_string();
    let sign = switchyard::dialect::tencent::sign(TOKEN, &t);

    // Missing, even with a valid Sign.
    let q = format!("CallbackCommand=Profile.CallbackPortraitSet&Sign={sign}&RequestTime={t}");
    let reply = post_json(&gw.url(&format!("/im/tencent?{q}")), &body).await;
    assert_tencent_error(&reply, 403, "SdkAppid");
    // Empty.
    let reply = post_json(&gw.url(&format!("/im/tencent?SdkAppid=&{q}")), &body).await;
    assert_tencent_error(&reply, 403, "SdkAppid");
    // Someone else's app.
    let reply = post_json(
        &gw.url(&format!("/im/tencent?SdkAppid=1400000001&{q}")),
        &body,
    )
    .await;
    assert_tencent_error(&reply, 403, "1400000001");
    // The id of another source is not this source's.
    let reply = post_json(
        &gw.url(&format!("/im/tencent?SdkAppid=1400000009&{q}")),
        &body,
    )
    .await;
    assert_tencent_error(&reply, 403, "1400000009");
    // Without a token the app id is still checked.
    let reply = post_json(
        &gw.url("/im/tencent-open?SdkAppid=1400000001&CallbackCommand=Profile.CallbackPortraitSet"),
        &body,
    )
    .await;
    assert_tencent_error(&reply, 403, "1400000001");

    assert_eq!(gw.metric(&callbacks("t", "", "forbidden")).await, 4.0);
    assert_eq!(gw.metric(&callbacks("tn", "", "forbidden")).await, 1.0);
    assert_only_barrier_delivered(&gw, &sink).await;

    // Every listed id is accepted.
    let reply = post_json(
        &gw.url("/im/tencent-open?SdkAppid=1400000009&CallbackCommand=Profile.CallbackPortraitSet"),
        &body,
    )
    .await;
    assert_ok(Shape::Tencent, &reply);
    let got = sink.wait_for(2, WAIT).await;
    assert_eq!(got[1].uri, "/tn/Profile.CallbackPortraitSet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tencent_sign_and_request_time_are_checked() {
    let sink = Sink::start().await;
    let rules = standard_rules(&sink);
    let gw = Gateway::start(rules.path());
    let body = sample("tencent/Profile.CallbackPortraitSet.json");
    let cmd = "Profile.CallbackPortraitSet";
    let base = format!("SdkAppid={APP_ID}&CallbackCommand={cmd}&contenttype=json");
    let now = now_secs();
    let good_sign = switchyard::dialect::tencent::sign(TOKEN, &now.to_string());

    let refused = [
        // No Sign at all.
        (format!("{base}&RequestTime={now}"), "Sign"),
        // Neither Sign nor RequestTime.
        (base.clone(), "Sign"),
        // No RequestTime.
        (format!("{base}&Sign={good_sign}"), "RequestTime"),
        // Signed with another token.
        (signed_query(cmd, now, "another-token"), "Sign"),
        // A valid Sign replayed with another RequestTime.
        (
            format!("{base}&Sign={good_sign}&RequestTime={}", now + 1),
            "Sign",
        ),
        // Correctly signed, but too old and too far ahead (max_clock_skew is 60s).
        (signed_query(cmd, now - 120, TOKEN), "RequestTime"),
        (signed_query(cmd, now + 120, TOKEN), "RequestTime"),
        // Not a number.
        (
            format!(
                "{base}&Sign={}&RequestTime=soon",
                switchyard::dialect::tencent::sign(TOKEN, "soon")
            ),
            "RequestTime",
        ),
        // Truncated Sign.
        (
            format!("{base}&Sign={}&RequestTime={now}", &good_sign[..63]),
            "Sign",
        ),
    ];
    for (query, mentions) in &refused {
        let reply = post_json(&gw.url(&format!("/im/tencent?{query}")), &body).await;
        assert_tencent_error(&reply, 401, mentions);
    }
    assert_eq!(
        gw.metric(&callbacks("t", "", "unauthorized")).await,
        refused.len() as f64
    );
    assert_only_barrier_delivered(&gw, &sink).await;

    // Accepted: upper-case hex, and a RequestTime inside the allowed skew either way.
    let upper = format!("{base}&Sign={}&RequestTime={now}", good_sign.to_uppercase());
    let reply = post_json(&gw.url(&format!("/im/tencent?{upper}")), &body).await;
    assert_ok(Shape::Tencent, &reply);
    for time in [now - 30, now + 30] {
        let reply = post_json(
            &gw.url(&format!("/im/tencent?{}", signed_query(cmd, time, TOKEN))),
            &body,
        )
        .await;
        assert_ok(Shape::Tencent, &reply);
    }
    let got = sink.wait_for(4, WAIT).await;
    assert!(got[1..]
        .iter()
        .all(|r| r.uri == "/t/Profile.CallbackPortraitSet" && r.body == body.as_bytes()));
    assert_eq!(
        gw.metric(&callbacks("t", cmd, "routed")).await,
        3.0,
        "{}",
        gw.metrics().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tencent_ok_answer_and_the_original_bytes_go_downstream() {
    let sink = Sink::start().await;
    let rules = standard_rules(&sink);
    let gw = Gateway::start(rules.path());
    // Key order, spacing, number formats, escapes and a trailing newline must all survive.
    let body = "{\"zeta\": 1.50,\"CallbackCommand\":\"Group.CallbackAfterGroupInfoChanged\",  \"alpha\":1e3,\"neg\":-0.0,\
\"big\":123456789012345678901234567890,\"esc\":\"\\u00e9\\ud83d\\ude00\\/\",\"n\":{\"b\":[1,2.0,3E-2],\"a\":null}}\n";
    let ct = "application/json; charset=utf-8";
    let reply = send(
        "POST",
        &gw.url(&format!(
            "/im/tencent?{}",
            tencent_query("Group.CallbackAfterGroupInfoChanged", Some(TOKEN))
        )),
        &[("content-type", ct)],
        body.to_string(),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, TENCENT_OK);
    assert_eq!(reply.headers["content-type"], "application/json");

    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].method, "POST");
    assert_eq!(got[0].uri, "/t/Group.CallbackAfterGroupInfoChanged");
    assert_eq!(
        std::str::from_utf8(&got[0].body).unwrap(),
        body,
        "the body must arrive byte for byte"
    );
    assert_eq!(got[0].header("content-type"), ct);
    assert_eq!(got[0].header("x-switchyard-source"), "t");
    assert_eq!(
        got[0].header("x-switchyard-command"),
        "Group.CallbackAfterGroupInfoChanged"
    );
    assert_eq!(
        gw.metric(&callbacks(
            "t",
            "Group.CallbackAfterGroupInfoChanged",
            "routed"
        ))
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tencent_command_comes_from_the_query_else_the_body() {
    let sink = Sink::start().await;
    let rules = standard_rules(&sink);
    let gw = Gateway::start(rules.path());
    let url = |query: &str| gw.url(&format!("/im/tencent-open?SdkAppid={APP_ID}{query}"));
    let cases = [
        // The query wins over the body.
        (
            "&CallbackCommand=Query.Command",
            r#"{"CallbackCommand":"Body.Command","n":1}"#,
            "/tn/Query.Command",
        ),
        // No query command: the body's.
        (
            "&contenttype=json",
            r#"{"CallbackCommand":"Body.Command","n":2}"#,
            "/tn/Body.Command",
        ),
        // An empty query command counts as none.
        (
            "&CallbackCommand=",
            r#"{"n":3,"CallbackCommand":"Body.Command"}"#,
            "/tn/Body.Command",
        ),
        // Neither: the command is "".
        ("", r#"{"n":4}"#, "/tn/"),
    ];
    for (query, body, _) in &cases {
        let reply = post_json(&url(query), body).await;
        assert_ok(Shape::Tencent, &reply);
    }
    let got = sink.wait_for(cases.len(), WAIT).await;
    for (i, (_, _, uri)) in cases.iter().enumerate() {
        let r = got
            .iter()
            .find(|r| r.json()["n"] == i + 1)
            .expect("every case delivered");
        assert_eq!(&r.uri, uri, "case {}", i + 1);
        let command = uri.trim_start_matches("/tn/");
        assert_eq!(r.header("x-switchyard-command"), command);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tencent_unknown_query_parameters_are_kept_for_scripts() {
    let sink = Sink::start().await;
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            r#"sources:
  t: {{path: /im/tencent, dialect: tencent, app_ids: ['{APP_ID}'], token: {TOKEN}}}
targets:
  s: {{url: '{}/x'}}
routes:
  - name: q
    transform: |
      #{{
        request_id: query.RequestID,
        odd: query["X-Odd"],
        ip: query.ClientIP,
        platform: query.OptPlatform,
        app_id: app_id,
        command: command,
        dialect: dialect,
        source: source,
        event_id: event_id,
        received_at: received_at,
        sign_seen: "Sign" in query,
      }}
    to: [s]
"#,
            sink.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    let before = now_secs() * 1000;
    let query = format!(
        "{}&RequestID=req-42&X-Odd=%E4%B8%AD%20x",
        tencent_query("State.StateChange", Some(TOKEN))
    );
    let reply = post_json(
        &gw.url(&format!("/im/tencent?{query}")),
        r#"{"CallbackCommand":"State.StateChange","Info":{"Action":"Login"}}"#,
    )
    .await;
    assert_ok(Shape::Tencent, &reply);
    let got = sink.wait_for(1, WAIT).await;
    let v = got[0].json();
    assert_eq!(v["request_id"], "req-42");
    assert_eq!(v["odd"], "中 x");
    assert_eq!(v["ip"], "127.0.0.1");
    assert_eq!(v["platform"], "RESTAPI");
    assert_eq!(v["app_id"], APP_ID);
    assert_eq!(v["command"], "State.StateChange");
    assert_eq!(v["dialect"], "tencent");
    assert_eq!(v["source"], "t");
    assert_eq!(v["sign_seen"], true);
    assert_eq!(v["event_id"], got[0].header("x-switchyard-event"));
    let at = v["received_at"].as_u64().unwrap();
    assert!(
        at >= before && at <= now_secs() * 1000 + 1000,
        "received_at {at}"
    );
    assert_eq!(got[0].header("content-type"), "application/json");
}

// ---------------------------------------------------------------------------------------------
// openim

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openim_accepts_all_three_command_forms() {
    let sink = Sink::start().await;
    let rules = standard_rules(&sink);
    let gw = Gateway::start(rules.path());
    let sample_body = sample("openim/callbackAfterUpdateUserInfoCommand.json");
    let cases: Vec<(String, String, &str)> = vec![
        // v3.5+: {path}/{command}.
        (
            "/im/openim/callbackAfterUpdateUserInfoCommand".into(),
            sample_body.replace("\"ex\"", "\"n\":1,\"ex\""),
            "/o/callbackAfterUpdateUserInfoCommand",
        ),
        // v3.0–3.4: ?command=.
        (
            "/im/openim?command=callbackAfterSendSingleMsgCommand".into(),
            r#"{"n":2,"sendID":"a"}"#.into(),
            "/o/callbackAfterSendSingleMsgCommand",
        ),
        // v2: the body's callbackCommand.
        (
            "/im/openim".into(),
            r#"{"callbackCommand":"callbackAfterUserOnlineCommand","n":3}"#.into(),
            "/o/callbackAfterUserOnlineCommand",
        ),
        // The path wins over the query and the body; unknown parameters (?key=) are fine.
        (
            "/im/openim/callbackAfterSendGroupMsgCommand?command=fromQuery&key=eyJzZW5kSUQiOiJhIn0%3D"
                .into(),
            r#"{"callbackCommand":"fromBody","n":4}"#.into(),
            "/o/callbackAfterSendGroupMsgCommand",
        ),
        // The query wins over the body.
        (
            "/im/openim?command=fromQuery".into(),
            r#"{"callbackCommand":"fromBody","n":5}"#.into(),
            "/o/fromQuery",
        ),
        // None at all: "".
        ("/im/openim".into(), r#"{"n":6}"#.into(), "/o/"),
    ];
    for (path, body, _) in &cases {
        let reply = send(
            "POST",
            &gw.url(path),
            &[("content-type", "application/json; charset=utf-8")],
            body.clone(),
        )
        .await;
        assert_ok(Shape::OpenIm, &reply);
    }
    let got = sink.wait_for(cases.len(), WAIT).await;
    for (i, (_, body, uri)) in cases.iter().enumerate() {
        let r = got
            .iter()
            .find(|r| r.json()["n"] == i + 1)
            .expect("every case delivered");
        assert_eq!(&r.uri, uri, "case {}", i + 1);
        assert_eq!(r.body, body.as_bytes());
        assert_eq!(r.header("content-type"), "application/json; charset=utf-8");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openim_operation_id_header_reaches_scripts() {
    let sink = Sink::start().await;
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            r#"sources:
  o: {{path: /im/openim, dialect: openim}}
targets:
  s: {{url: '{}/x'}}
routes:
  - name: op
    transform: '#{{op: headers.operationid, ct: headers["content-type"], cmd: command, dialect: dialect, app_id: app_id, user: body.userID}}'
    to: [s]
"#,
            sink.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    // Sent the way Go's net/http writes it: `Operationid`.
    let body = sample("openim/callbackAfterUpdateUserInfoCommand.json");
    let request = format!(
        "POST /im/openim/callbackAfterUpdateUserInfoCommand HTTP/1.1\r\nHost: gw\r\n\
Operationid: op-1234\r\nContent-Type: application/json; charset=utf-8\r\n\
Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let reply = raw_request(gw.ingress, request.into_bytes())
        .await
        .expect("an answer");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, OPENIM_OK.as_bytes());
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(
        got[0].json(),
        json!({
            "op": "op-1234",
            "ct": "application/json; charset=utf-8",
            "cmd": "callbackAfterUpdateUserInfoCommand",
            "dialect": "openim",
            "app_id": "",
            "user": "user123",
        })
    );
}

// ---------------------------------------------------------------------------------------------
// generic

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_command_from_body_header_or_query() {
    let sink = Sink::start().await;
    let rules = standard_rules(&sink);
    let gw = Gateway::start(rules.path());
    // (path and query, headers, body, the URI the sink sees)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "/hooks/g",
            vec![],
            r#"{"meta":{"type":"user.created"},"n":1}"#,
            "/g/user.created",
        ),
        // A number is a command too.
        ("/hooks/g", vec![], r#"{"meta":{"type":7},"n":2}"#, "/g/7"),
        // Missing on the path, or not a scalar: "".
        ("/hooks/g", vec![], r#"{"meta":{},"n":3}"#, "/g/"),
        ("/hooks/g", vec![], r#"{"meta":"flat","n":4}"#, "/g/"),
        (
            "/hooks/g",
            vec![],
            r#"{"meta":{"type":{"x":1}},"n":5}"#,
            "/g/",
        ),
        (
            "/hooks/gh",
            vec![("X-Event-Type", "order.paid")],
            r#"{"n":6}"#,
            "/gh/order.paid",
        ),
        ("/hooks/gh", vec![], r#"{"n":7}"#, "/gh/"),
        (
            "/hooks/gq?event=ping&other=1",
            vec![],
            r#"{"n":8}"#,
            "/gq/ping",
        ),
        ("/hooks/gq", vec![], r#"{"n":9}"#, "/gq/"),
    ];
    for (path, headers, body, _) in &cases {
        let mut h = headers.clone();
        h.push(("content-type", "application/json"));
        let reply = send("POST", &gw.url(path), &h, body.to_string()).await;
        assert_ok(Shape::Generic, &reply);
    }
    let got = sink.wait_for(cases.len(), WAIT).await;
    for (i, (_, _, body, uri)) in cases.iter().enumerate() {
        let r = got
            .iter()
            .find(|r| r.json()["n"] == i + 1)
            .expect("every case delivered");
        assert_eq!(&r.uri, uri, "case {}", i + 1);
        assert_eq!(r.body, body.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_ok_answer_names_the_event_the_sink_receives() {
    let sink = Sink::start().await;
    let rules = standard_rules(&sink);
    let gw = Gateway::start(rules.path());
    let mut ids = Vec::new();
    for n in 1..=3 {
        let reply = post_json(
            &gw.url("/hooks/g"),
            &format!(r#"{{"meta":{{"type":"t"}},"n":{n}}}"#),
        )
        .await;
        assert_ok(Shape::Generic, &reply);
        ids.push((n, reply.json()["event_id"].as_str().unwrap().to_string()));
    }
    let got = sink.wait_for(3, WAIT).await;
    for (n, id) in &ids {
        let r = got.iter().find(|r| r.json()["n"] == *n).unwrap();
        assert_eq!(r.header("x-switchyard-event"), id);
    }
    let mut distinct: Vec<&String> = ids.iter().map(|(_, id)| id).collect();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "event ids must differ: {ids:?}");
}

// ---------------------------------------------------------------------------------------------
// every dialect: rejections

/// (source name, path with a valid query, error shape)
fn dialect_paths() -> Vec<(&'static str, String, Shape)> {
    vec![
        (
            "t",
            format!(
                "/im/tencent?{}",
                tencent_query("Profile.CallbackPortraitSet", Some(TOKEN))
            ),
            Shape::Tencent,
        ),
        (
            "o",
            "/im/openim/callbackAfterUpdateUserInfoCommand".to_string(),
            Shape::OpenIm,
        ),
        ("g", "/hooks/g".to_string(), Shape::Generic),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_post_is_allowed() {
    let sink = Sink::start().await;
    let rules = standard_rules(&sink);
    let gw = Gateway::start(rules.path());
    for (source, path, shape) in dialect_paths() {
        for method in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"] {
            let reply = send(method, &gw.url(&path), &[], r#"{"meta":{"type":"x"}}"#).await;
            assert_error(shape, &reply, 405, method);
            assert_eq!(reply.headers["allow"], "POST", "{method} {path}");
        }
        // HEAD answers have no body, but the status and Allow are the same.
        let reply = send("HEAD", &gw.url(&path), &[], "").await;
        assert_eq!(reply.status, 405);
        assert_eq!(reply.headers["allow"], "POST");
        assert_eq!(
            gw.metric(&callbacks(source, "", "method_not_allowed"))
                .await,
            6.0,
            "{source}"
        );
    }
    assert_only_barrier_delivered(&gw, &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_404() {
    let sink = Sink::start().await;
    let rules = standard_rules(&sink);
    let gw = Gateway::start(rules.path());
    let paths = [
        "/",
        "/nope",
        "/im/tencent/extra",
        "/im/tencent-open/",
        "/im/openim/",
        "/im/openim/a/b",
        "/hooks/g/x",
        "/hooks",
        "/IM/TENCENT",
    ];
    for path in paths {
        let reply = post_json(&gw.url(path), r#"{"meta":{"type":"x"}}"#).await;
        assert_generic_error(&reply, 404, path);
    }
    // Unknown paths are refused whatever the method.
    let reply = send("GET", &gw.url("/nope"), &[], "").await;
    assert_generic_error(&reply, 404, "/nope");
    assert_eq!(
        gw.metric(&callbacks("", "", "not_found")).await,
        paths.len() as f64 + 1.0
    );
    assert_only_barrier_delivered(&gw, &sink).await;
}

/// A JSON object of exactly `len` bytes that every dialect in `standard_rules` accepts.
fn json_of_len(len: usize) -> String {
    let head = r#"{"meta":{"type":"big"},"pad":""#;
    let tail = "\"}";
    let pad = len - head.len() - tail.len();
    format!("{head}{}{tail}", "a".repeat(pad))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_body_are_413() {
    let sink = Sink::start().await;
    let rules = standard_rules(&sink);
    let gw = Gateway::start(rules.path());
    // max_body is 4KiB on t, o and g.
    for (source, path, shape) in dialect_paths() {
        // With a Content-Length: refused before the body is read.
        let reply = post_json(&gw.url(&path), &json_of_len(4097)).await;
        assert_error(shape, &reply, 413, "4096");
        let reply = post_json(&gw.url(&path), &json_of_len(64 * 1024)).await;
        assert_error(shape, &reply, 413, "4096");

        // Chunked, no Content-Length: refused once the limit is crossed.
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n\
Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        request.extend(chunked(json_of_len(4097).as_bytes(), 1000));
        let raw = raw_request(gw.ingress, request).await.expect("an answer");
        let reply = Reply {
            status: raw.status,
            headers: http::HeaderMap::new(),
            body: String::from_utf8(raw.body).unwrap(),
        };
        assert_error(shape, &reply, 413, "4096");
        assert_eq!(
            gw.metric(&callbacks(source, "", "too_large")).await,
            3.0,
            "{source}"
        );
    }
    assert_only_barrier_delivered(&gw, &sink).await;

    // Exactly max_body is fine, chunked or not.
    let mut expected = 1;
    for (_, path, shape) in dialect_paths() {
        let body = json_of_len(4096);
        let reply = post_json(&gw.url(&path), &body).await;
        assert_ok(shape, &reply);
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n\
Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        request.extend(chunked(body.as_bytes(), 1000));
        let raw = raw_request(gw.ingress, request).await.expect("an answer");
        assert_eq!(raw.status, 200, "{raw:?}");
        expected += 2;
        let got = sink.wait_for(expected, WAIT).await;
        assert!(got[expected - 2..]
            .iter()
            .all(|r| r.body == body.as_bytes()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_are_not_json_are_400() {
    let sink = Sink::start().await;
    let rules = standard_rules(&sink);
    let gw = Gateway::start(rules.path());
    let bad: [&[u8]; 6] = [
        b"",
        b"not json",
        b"{",
        b"{\"a\":1} trailing",
        b"{\"a\":\"\xff\xfe\"}",
        b"<xml/>",
    ];
    let mut paths = dialect_paths();
    paths.push(("gh", "/hooks/gh".to_string(), Shape::Generic));
    for (source, path, shape) in &paths {
        for body in bad {
            let reply = send(
                "POST",
                &gw.url(path),
                &[("content-type", "application/json")],
                body.to_vec(),
            )
            .await;
            assert_error(*shape, &reply, 400, "JSON");
        }
        assert_eq!(
            gw.metric(&callbacks(source, "", "bad_request")).await,
            bad.len() as f64,
            "{source}"
        );
    }
    // Tencent and OpenIM bodies are objects.
    for (source, path, shape) in &paths[..2] {
        for body in [
            "[1,2]",
            "\"text\"",
            "12",
            "null",
            "[null]",
            " [\"Profile.X\"]",
        ] {
            let reply = post_json(&gw.url(path), body).await;
            assert_error(*shape, &reply, 400, "object");
        }
        assert_eq!(
            gw.metric(&callbacks(source, "", "bad_request")).await,
            bad.len() as f64 + 6.0,
            "{source}"
        );
    }
    assert_only_barrier_delivered(&gw, &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_no_route_matches_are_acknowledged_and_counted() {
    let sink = Sink::start().await;
    let rules = standard_rules(&sink);
    // Only the barrier's command is routed.
    rules.write(
        "routes.yaml",
        &format!(
            "targets:\n  s: {{url: '{}/{{source}}/{{command}}'}}\nroutes:\n  - {{name: some, commands: [barrier], to: [s]}}\n",
            sink.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    let reply = post_json(
        &gw.url(&format!(
            "/im/tencent?{}",
            tencent_query("Profile.CallbackPortraitSet", Some(TOKEN))
        )),
        &sample("tencent/Profile.CallbackPortraitSet.json"),
    )
    .await;
    assert_ok(Shape::Tencent, &reply);
    let reply = post_json(
        &gw.url("/im/openim/callbackAfterUpdateUserInfoCommand"),
        &sample("openim/callbackAfterUpdateUserInfoCommand.json"),
    )
    .await;
    assert_ok(Shape::OpenIm, &reply);
    let reply = post_json(&gw.url("/hooks/g"), r#"{"meta":{"type":"other"}}"#).await;
    assert_ok(Shape::Generic, &reply);
    let reply = post_json(&gw.url("/hooks/g"), r#"{"meta":{"type":"other"}}"#).await;
    assert_ok(Shape::Generic, &reply);

    assert_eq!(
        gw.metric(&callbacks("t", "Profile.CallbackPortraitSet", "unrouted"))
            .await,
        1.0
    );
    assert_eq!(
        gw.metric(&callbacks(
            "o",
            "callbackAfterUpdateUserInfoCommand",
            "unrouted"
        ))
        .await,
        1.0
    );
    assert_eq!(gw.metric(&callbacks("g", "other", "unrouted")).await, 2.0);
    assert_only_barrier_delivered(&gw, &sink).await;
    assert_eq!(gw.metric(&callbacks("g", "barrier", "routed")).await, 1.0);
}

// ---------------------------------------------------------------------------------------------
// scripts failing at runtime (SPEC §3)

/// A JSON log line with this route and stage.
fn script_error_log(gw: &Gateway, route: &str, stage: &str) -> Option<Value> {
    gw.logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["route"] == route && v["stage"] == stage)
}

async fn wait_script_error_log(gw: &Gateway, route: &str, stage: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = script_error_log(gw, route, stage) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no log line for route {route} stage {stage}; log:\n{}",
            gw.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_script_fails_its_route_only() {
    let sink = Sink::start().await;
    let rules = RulesDir::new();
    let file = rules.write(
        "r.yaml",
        &format!(
            r#"sources:
  tn: {{path: /im/tencent, dialect: tencent, app_ids: ['{APP_ID}']}}
targets:
  s: {{url: '{}/{{route}}'}}
routes:
  - name: missing-field
    filter: 'body.Missing.Sub == 1'
    to: [s]
  - name: not-a-bool
    filter: 'body.From_Account'
    to: [s]
  - name: bad-transform
    transform: |
      let user = body.From_Account;
      #{{user: user, deep: body.Missing.Deeper.Still}}
    to: [s]
  - name: bad-transform-file
    transform_file: scripts/bad.rhai
    to: [s]
  - name: good
    to: [s]
  - name: good-transformed
    transform: '#{{user: body.From_Account}}'
    to: [s]
"#,
            sink.url()
        ),
    );
    let script = rules.write(
        "scripts/bad.rhai",
        "// fails on its third line\nlet items = body.ProfileItem;\nlet x = items[99].Tag;\n#{x: x}\n",
    );
    let gw = Gateway::start(rules.path());
    let reply = post_json(
        &gw.url(&format!(
            "/im/tencent?{}",
            tencent_query("Profile.CallbackPortraitSet", None)
        )),
        &sample("tencent/Profile.CallbackPortraitSet.json"),
    )
    .await;
    assert_ok(Shape::Tencent, &reply);

    // The siblings deliver; the failing routes do not.
    sink.wait_for(2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut uris: Vec<String> = sink.received().into_iter().map(|r| r.uri).collect();
    uris.sort();
    assert_eq!(uris, ["/good", "/good-transformed"]);
    assert_eq!(
        gw.metric(&callbacks("tn", "Profile.CallbackPortraitSet", "routed"))
            .await,
        1.0
    );

    let file = file.display().to_string();
    let script = script.display().to_string();
    for (route, stage, location) in [
        ("missing-field", "filter", format!("{file}:7")),
        ("not-a-bool", "filter", format!("{file}:10")),
        ("bad-transform", "transform", format!("{file}:15")),
        ("bad-transform-file", "transform", format!("{script}:3")),
    ] {
        assert_eq!(
            gw.metric(&script_errors(route, stage)).await,
            1.0,
            "{route}: {}",
            gw.metrics().await
        );
        let log = wait_script_error_log(&gw, route, stage).await;
        assert_eq!(log["location"], location.as_str(), "{route}: {log}");
        assert!(
            !log["error"].as_str().unwrap_or("").is_empty(),
            "{route}: {log}"
        );
        assert_eq!(log["command"], "Profile.CallbackPortraitSet", "{log}");
        assert!(
            log["event_id"].as_str().is_some_and(|s| !s.is_empty()),
            "{log}"
        );
    }
    let log = script_error_log(&gw, "not-a-bool", "filter").unwrap();
    assert!(
        log["error"].as_str().unwrap().contains("bool"),
        "the message says what was wrong: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_script_hits_the_operation_limit() {
    let sink = Sink::start().await;
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            r#"sources:
  g: {{path: /hooks/g, dialect: generic, command: body.type}}
targets:
  s: {{url: '{}/{{route}}'}}
routes:
  - name: spin-filter
    filter: 'loop {{}}'
    to: [s]
  - name: spin-transform
    transform: |
      let n = 0;
      while true {{ n += 1; }}
      #{{n: n}}
    to: [s]
  - name: good
    to: [s]
"#,
            sink.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    for n in 1..=3 {
        let started = Instant::now();
        let reply = post_json(&gw.url("/hooks/g"), &format!(r#"{{"type":"x","n":{n}}}"#)).await;
        let took = started.elapsed();
        assert_ok(Shape::Generic, &reply);
        assert!(
            took < Duration::from_secs(2),
            "the ack took {took:?} behind a runaway script"
        );
    }
    sink.wait_for(3, WAIT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = sink.received();
    assert_eq!(got.len(), 3, "{got:#?}");
    assert!(got.iter().all(|r| r.uri == "/good"));
    assert_eq!(
        gw.metric(&script_errors("spin-filter", "filter")).await,
        3.0
    );
    assert_eq!(
        gw.metric(&script_errors("spin-transform", "transform"))
            .await,
        3.0
    );
    let log = wait_script_error_log(&gw, "spin-filter", "filter").await;
    assert!(
        log["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("operations"),
        "{log}"
    );
    assert!(
        log["location"]
            .as_str()
            .unwrap()
            .starts_with(&rules.path().join("r.yaml").display().to_string()),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transform_returning_unit_delivers_nothing_on_its_route() {
    let sink = Sink::start().await;
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            r#"sources:
  g: {{path: /hooks/g, dialect: generic, command: body.type}}
targets:
  s: {{url: '{}/{{route}}'}}
routes:
  - name: maybe
    transform: 'if body.skip {{ () }} else {{ #{{n: body.n}} }}'
    to: [s]
  - name: always
    to: [s]
"#,
            sink.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    let skipped = r#"{"type":"x","skip":true,"n":1}"#;
    let kept = r#"{"type":"x","skip":false,"n":2}"#;
    assert_ok(
        Shape::Generic,
        &post_json(&gw.url("/hooks/g"), skipped).await,
    );
    assert_ok(Shape::Generic, &post_json(&gw.url("/hooks/g"), kept).await);
    sink.wait_for(3, WAIT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = sink.received();
    let maybe: Vec<Value> = got
        .iter()
        .filter(|r| r.uri == "/maybe")
        .map(|r| r.json())
        .collect();
    assert_eq!(maybe, [json!({"n": 2})]);
    let mut always: Vec<&[u8]> = got
        .iter()
        .filter(|r| r.uri == "/always")
        .map(|r| &r.body[..])
        .collect();
    always.sort();
    let mut expected = [skipped.as_bytes(), kept.as_bytes()];
    expected.sort();
    assert_eq!(always, expected);
    // Returning () is a decision, not an error.
    assert!(!gw
        .metrics()
        .await
        .contains("switchyard_script_errors_total"));
}
