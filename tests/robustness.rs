//! Hostile input at every dialect: random bytes, huge and deeply nested bodies, invalid UTF-8,
//! garbage query strings and headers, broken and stalled TCP clients. Every request gets an
//! answer with a 4xx status in its dialect's shape (for what is not HTTP at all: a 4xx from the
//! HTTP layer), and the server keeps serving everyone else.

mod support;

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use support::*;

const WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Shape {
    Tencent,
    OpenIm,
    Generic,
}

fn rules(sink: &Sink) -> RulesDir {
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            r#"sources:
  t:  {{path: /im/tencent, dialect: tencent, app_ids: ['{APP_ID}'], token: {TOKEN}}}
  tn: {{path: /im/tencent-open, dialect: tencent, app_ids: ['{APP_ID}']}}
  o:  {{path: /im/openim, dialect: openim}}
  g:  {{path: /hooks/g, dialect: generic, command: body.type}}
  gh: {{path: /hooks/gh, dialect: generic, command: header.x-event-type}}
targets:
  s: {{url: '{sink}/{{source}}/{{command}}'}}
  scripted: {{url: '{sink}/scripted/{{source}}'}}
routes:
  - {{name: all, to: [s]}}
  # Makes every accepted body go through the script engine too.
  - name: reads-body
    filter: 'type_of(body) == "map" && body.len() >= 0'
    transform: '#{{keys: body.keys().len(), command: command}}'
    to: [scripted]
"#,
            sink = sink.url()
        ),
    );
    rules
}

/// Every ingress path, each with a query that passes the checks before the body.
fn endpoints() -> Vec<(&'static str, String, Shape)> {
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
            "tn",
            format!(
                "/im/tencent-open?{}",
                tencent_query("Group.CallbackAfterGroupInfoChanged", None)
            ),
            Shape::Tencent,
        ),
        (
            "o",
            "/im/openim/callbackAfterUpdateUserInfoCommand".to_string(),
            Shape::OpenIm,
        ),
        ("g", "/hooks/g".to_string(), Shape::Generic),
        ("gh", "/hooks/gh".to_string(), Shape::Generic),
    ]
}

/// Checks the answer's shape: the dialect's OK body for 200, its error body otherwise.
fn assert_shape(shape: Shape, status: u16, body: &[u8], context: &str) {
    let v: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "{context}: answer is not JSON ({e}): {:?}",
            String::from_utf8_lossy(body)
        )
    });
    let ok = status == 200;
    match shape {
        Shape::Tencent if ok => {
            assert_eq!(
                body, br#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}"#,
                "{context}"
            )
        }
        Shape::Tencent => {
            assert_eq!(v["ActionStatus"], "FAIL", "{context}: {v}");
            assert_eq!(v["ErrorCode"], 1, "{context}: {v}");
            assert!(
                v["ErrorInfo"].as_str().is_some_and(|s| !s.is_empty()),
                "{context}: {v}"
            );
        }
        Shape::OpenIm if ok => assert_eq!(
            body, br#"{"actionCode":0,"errCode":0,"errMsg":"","errDlt":"","nextCode":0}"#,
            "{context}"
        ),
        Shape::OpenIm => {
            assert_eq!(v["actionCode"], 1, "{context}: {v}");
            assert_eq!(v["errCode"], status, "{context}: {v}");
            assert!(
                v["errMsg"].as_str().is_some_and(|s| !s.is_empty()),
                "{context}: {v}"
            );
        }
        Shape::Generic if ok => {
            assert_eq!(v["ok"], true, "{context}: {v}");
            assert!(
                v["event_id"].as_str().is_some_and(|s| !s.is_empty()),
                "{context}: {v}"
            );
        }
        Shape::Generic => {
            assert_eq!(v["ok"], false, "{context}: {v}");
            assert!(
                v["error"].as_str().is_some_and(|s| !s.is_empty()),
                "{context}: {v}"
            );
        }
    }
}

/// The status a dialect must answer for this body (the query and headers being valid).
fn expected_status(shape: Shape, body: &[u8]) -> u16 {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return 400;
    };
    let field = match shape {
        Shape::Tencent => "CallbackCommand",
        Shape::OpenIm => "callbackCommand",
        Shape::Generic => return 200,
    };
    match v.as_object() {
        None => 400,
        Some(o) => match o.get(field) {
            None | Some(Value::Null) | Some(Value::String(_)) => 200,
            Some(_) => 400,
        },
    }
}

/// A valid callback is still accepted and delivered, and the admin listener answers.
async fn assert_still_serving(gw: &Gateway, sink: &Sink) {
    let before = sink.count();
    let reply = post_json(&gw.url("/hooks/g"), r#"{"type":"still-alive"}"#).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let got = sink.wait_for(before + 2, WAIT).await;
    assert!(
        got.iter().any(|r| r.uri == "/g/still-alive"),
        "the valid callback was not delivered"
    );
    let health = client().get(gw.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

fn http_request(path: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n{extra_headers}\
Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bodies_get_an_answer_in_the_dialects_shape() {
    let sink = Sink::start().await;
    let rules = rules(&sink);
    let gw = Gateway::start(rules.path());
    let mut rng = StdRng::seed_from_u64(0x5917_c4ad);
    let samples = [
        sample("tencent/Profile.CallbackPortraitSet.json"),
        sample("tencent/Group.CallbackAfterGroupInfoChanged.json"),
        sample("openim/callbackAfterUpdateUserInfoCommand.json"),
    ];
    let mut accepted = 0;
    for (source, path, shape) in endpoints() {
        let mut refused = 0;
        for i in 0..60 {
            let body: Vec<u8> = match i % 3 {
                // Pure noise.
                0 => {
                    let len = rng.random_range(0..2048);
                    (0..len).map(|_| rng.random::<u8>()).collect()
                }
                // A sample with a few bytes changed.
                1 => {
                    let mut b = samples[rng.random_range(0..samples.len())]
                        .clone()
                        .into_bytes();
                    for _ in 0..rng.random_range(1..4) {
                        let at = rng.random_range(0..b.len());
                        b[at] = rng.random();
                    }
                    b
                }
                // A sample cut short.
                _ => {
                    let b = samples[rng.random_range(0..samples.len())].as_bytes();
                    b[..rng.random_range(0..b.len())].to_vec()
                }
            };
            let expected = expected_status(shape, &body);
            let reply = send(
                "POST",
                &gw.url(&path),
                &[
                    ("content-type", "application/json"),
                    ("x-event-type", "fuzz"),
                ],
                body.clone(),
            )
            .await;
            let context = format!("{source} #{i} body {:?}", String::from_utf8_lossy(&body));
            assert_eq!(reply.status, expected, "{context}: {}", reply.body);
            assert_shape(shape, reply.status, reply.body.as_bytes(), &context);
            if expected == 400 {
                refused += 1;
            } else {
                accepted += 1;
            }
        }
        assert!(refused > 20, "{source}: the fuzz should mostly be refused");
        assert_eq!(
            gw.metric(&format!(
                "switchyard_callbacks_total{{source=\"{source}\",command=\"\",outcome=\"bad_request\"}}"
            ))
            .await,
            refused as f64,
            "{source}"
        );
    }
    // What was accepted was delivered (by the unscripted route at least).
    let got = sink.wait_for(accepted, WAIT).await;
    assert!(got.len() >= accepted);
    assert_still_serving(&gw, &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_bodies_are_refused_with_413() {
    let sink = Sink::start().await;
    let rules = rules(&sink);
    let gw = Gateway::start(rules.path());
    let huge = {
        let mut b = br#"{"type":"huge","pad":""#.to_vec();
        b.extend(std::iter::repeat_n(b'a', 8 << 20));
        b.extend_from_slice(br#""}"#);
        b
    };
    for (source, path, shape) in endpoints() {
        // Declared with Content-Length (refused before the body is read).
        let reply = raw_request(gw.ingress, http_request(&path, "", &huge))
            .await
            .unwrap_or_else(|| panic!("{source}: no answer"));
        assert_eq!(reply.status, 413, "{source}");
        assert_shape(shape, reply.status, &reply.body, source);

        // Chunked, with no length (refused once 1 MiB has been read).
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n\
Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        request.extend(chunked(&huge, 64 * 1024));
        let reply = raw_request(gw.ingress, request)
            .await
            .unwrap_or_else(|| panic!("{source}: no answer"));
        assert_eq!(reply.status, 413, "{source}");
        assert_shape(shape, reply.status, &reply.body, source);
    }
    assert_eq!(sink.count(), 0);
    assert_still_serving(&gw, &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_json_is_refused() {
    let sink = Sink::start().await;
    let rules = rules(&sink);
    let gw = Gateway::start(rules.path());
    let n = 100_000;
    let open = "[".repeat(n);
    let closed = format!("{}{}", "[".repeat(n), "]".repeat(n));
    let bodies = [
        open.clone(),
        closed.clone(),
        // Inside a field the dialects do not read.
        format!(r#"{{"type":"deep","x":{closed}}}"#),
        format!(
            r#"{{"type":"deep","x":{}1{}}}"#,
            r#"{"a":"#.repeat(n),
            "}".repeat(n)
        ),
        format!(r#"{{"type":"deep","x":{open}"#),
    ];
    for (source, path, shape) in endpoints() {
        for (i, body) in bodies.iter().enumerate() {
            let reply = send(
                "POST",
                &gw.url(&path),
                &[
                    ("content-type", "application/json"),
                    ("x-event-type", "deep"),
                ],
                body.clone(),
            )
            .await;
            assert_eq!(reply.status, 400, "{source} body #{i}: {}", reply.body);
            assert_shape(shape, reply.status, reply.body.as_bytes(), source);
        }
    }
    assert_eq!(sink.count(), 0);

    // Nesting that scripts can still read is accepted, and the scripted route sees the body.
    let deep = format!(
        r#"{{"type":"deep","CallbackCommand":"Deep","callbackCommand":"Deep","x":{}{}}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    for (source, path, shape) in endpoints() {
        let reply = send(
            "POST",
            &gw.url(&path),
            &[
                ("content-type", "application/json"),
                ("x-event-type", "deep"),
            ],
            deep.clone(),
        )
        .await;
        assert_eq!(reply.status, 200, "{source}: {}", reply.body);
        assert_shape(shape, reply.status, reply.body.as_bytes(), source);
    }
    let got = sink.wait_for(2 * endpoints().len(), WAIT).await;
    let scripted = got
        .iter()
        .filter(|r| r.uri.starts_with("/scripted/"))
        .count();
    assert_eq!(scripted, endpoints().len(), "{got:#?}");
    assert!(!gw
        .metrics()
        .await
        .contains("switchyard_script_errors_total"));
    assert_still_serving(&gw, &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_is_refused() {
    let sink = Sink::start().await;
    let rules = rules(&sink);
    let gw = Gateway::start(rules.path());
    let bodies: [&[u8]; 5] = [
        // In a field every dialect skips.
        b"{\"type\":\"x\",\"skipped\":\"\xff\xfe\"}",
        // Overlong encoding of '/'.
        b"{\"type\":\"x\",\"s\":\"\xc0\xaf\"}",
        // A UTF-16 surrogate encoded as UTF-8.
        b"{\"type\":\"x\",\"s\":\"\xed\xa0\x80\"}",
        // Truncated sequence at the end.
        b"{\"type\":\"x\"}\xe2\x82",
        // Latin-1 text.
        b"{\"type\":\"caf\xe9\"}",
    ];
    for (source, path, shape) in endpoints() {
        for (i, body) in bodies.iter().enumerate() {
            let reply = send(
                "POST",
                &gw.url(&path),
                &[("content-type", "application/json"), ("x-event-type", "x")],
                body.to_vec(),
            )
            .await;
            assert_eq!(reply.status, 400, "{source} body #{i}: {}", reply.body);
            assert_shape(shape, reply.status, reply.body.as_bytes(), source);
        }
    }
    assert_eq!(sink.count(), 0);
    assert_still_serving(&gw, &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_query_strings_and_headers() {
    let sink = Sink::start().await;
    let rules = rules(&sink);
    let gw = Gateway::start(rules.path());
    let body = sample("tencent/Profile.CallbackPortraitSet.json");
    let mut rng = StdRng::seed_from_u64(0xbad_9e7);

    // Tencent: whatever the query holds, the answer is a 403/401 in Tencent's shape.
    let noise: String = (0..4096)
        .map(|_| format!("%{:02x}", rng.random::<u8>()))
        .collect();
    let app = format!("SdkAppid={APP_ID}&CallbackCommand=Profile.CallbackPortraitSet");
    let cases = [
        ("%%%%&&&===&=&%zz".to_string(), 403),
        ("SdkAppid=%ff%fe%00&CallbackCommand=%00".to_string(), 403),
        (noise.clone(), 403),
        (format!("SdkAppid={noise}"), 403),
        (format!("{app}&Sign=%ff%00&RequestTime={}", now_secs()), 401),
        (
            format!("{app}&Sign={noise}&RequestTime={}", now_secs()),
            401,
        ),
        (
            format!("{app}&Sign=00&RequestTime=99999999999999999999999999"),
            401,
        ),
        (format!("{app}&Sign=00&RequestTime=-5"), 401),
        (format!("{app}&Sign=&RequestTime="), 401),
        (format!("{app}&Sign&RequestTime"), 401),
    ];
    for (query, status) in &cases {
        let reply = post_json(&gw.url(&format!("/im/tencent?{query}")), &body).await;
        assert_eq!(reply.status, *status, "{query}: {}", reply.body);
        assert_shape(Shape::Tencent, reply.status, reply.body.as_bytes(), query);
    }

    // Strange commands are accepted and routed; the metrics do not grow a label per command.
    let mut accepted = 0;
    for path in [
        "/im/openim?command=%ff%fe%00%0d%0a".to_string(),
        format!("/im/openim?command={noise}"),
        "/im/openim/%ff%00%20".to_string(),
        "/im/openim/a..b;c=d".to_string(),
        format!("/im/tencent-open?{app}%00%ff&RequestID=%ff&&&=&x"),
        format!("/hooks/g?{noise}"),
    ] {
        let shape = if path.starts_with("/im/openim") {
            Shape::OpenIm
        } else if path.starts_with("/im/tencent") {
            Shape::Tencent
        } else {
            Shape::Generic
        };
        let reply = post_json(&gw.url(&path), r#"{"type":"%ff\u0000"}"#).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        assert_shape(shape, reply.status, reply.body.as_bytes(), &path);
        accepted += 1;
    }

    // Headers: bytes that are not UTF-8, many headers, empty values, a command header of noise.
    let mut headers = String::new();
    for i in 0..80 {
        let value: String = (0..rng.random_range(0..200))
            .map(|_| char::from(rng.random_range(0x21u8..0x7f)))
            .collect();
        headers.push_str(&format!("X-Fuzz-{i}: {value}\r\n"));
    }
    let valid = br#"{"callbackCommand":"x","type":"x"}"#;
    for (source, path, shape) in endpoints() {
        for extra in [
            "X-Event-Type: \u{ff}\u{fe}\r\nOperationID: \u{e9}t\u{e9}\r\n".to_string(),
            "X-Event-Type:\r\nOperationID:\r\n".to_string(),
            headers.clone(),
        ] {
            // Latin-1 bytes (obs-text) on the wire, not UTF-8.
            let extra: Vec<u8> = extra.chars().map(|c| c as u32 as u8).collect();
            let mut request = format!("POST {path} HTTP/1.1\r\nHost: gw\r\n").into_bytes();
            request.extend(extra);
            request.extend(
                format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    valid.len()
                )
                .into_bytes(),
            );
            request.extend_from_slice(valid);
            let reply = raw_request(gw.ingress, request)
                .await
                .unwrap_or_else(|| panic!("{source}: no answer"));
            assert_eq!(reply.status, 200, "{source}: {reply:?}");
            assert_shape(shape, reply.status, &reply.body, source);
            accepted += 1;
        }
    }
    // Not valid HTTP: a 4xx from the HTTP layer (no dialect is known yet), nothing delivered.
    for request in [
        // Too many headers.
        format!(
            "POST /hooks/g HTTP/1.1\r\nHost: gw\r\n{}Content-Length: 2\r\n\r\n{{}}",
            "X-A: b\r\n".repeat(500)
        ),
        // One enormous header.
        format!(
            "POST /hooks/g HTTP/1.1\r\nHost: gw\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\n{{}}",
            "a".repeat(1 << 20)
        ),
        // A NUL and a bare CR in header values.
        "POST /hooks/g HTTP/1.1\r\nHost: gw\r\nX-A: a\0b\r\nContent-Length: 2\r\n\r\n{}"
            .to_string(),
        "POST /hooks/g HTTP/1.1\r\nHost: gw\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\n{}"
            .to_string(),
        // A length that overflows, and two that disagree.
        "POST /hooks/g HTTP/1.1\r\nHost: gw\r\nContent-Length: 99999999999999999999999\r\n\r\n{}"
            .to_string(),
        "POST /hooks/g HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
            .to_string(),
        // A header name that is not a token.
        "POST /hooks/g HTTP/1.1\r\nHost: gw\r\nBad Name: x\r\nContent-Length: 2\r\n\r\n{}"
            .to_string(),
    ] {
        let reply = raw_request(gw.ingress, request.clone().into_bytes())
            .await
            .unwrap_or_else(|| panic!("no answer to {:?}", &request[..60]));
        assert!(
            (400..500).contains(&reply.status),
            "{:?}: {reply:?}",
            &request[..60]
        );
    }
    sink.wait_for(accepted, WAIT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Each accepted callback went to `all`; the JSON objects also to `reads-body`.
    let got = sink.received();
    let all = got
        .iter()
        .filter(|r| !r.uri.starts_with("/scripted/"))
        .count();
    assert_eq!(all, accepted, "{got:#?}");

    let metrics = gw.metrics().await;
    let labels = metrics
        .lines()
        .filter(|l| l.starts_with("switchyard_callbacks_total{"))
        .count();
    assert!(labels < 20, "one label per garbage command?\n{metrics}");
    assert!(metrics.contains(r#"command="other""#), "{metrics}");
    assert_still_serving(&gw, &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_and_stalled_clients_do_not_block_others() {
    use tokio::io::AsyncWriteExt;
    let sink = Sink::start().await;
    let rules = rules(&sink);
    let gw = Gateway::start(rules.path());
    let mut rng = StdRng::seed_from_u64(0x7c9);

    // Garbage instead of HTTP: a 4xx, never a hang.
    for i in 0..20 {
        let len = rng.random_range(1..4096);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.random::<u8>()).collect();
        if i % 2 == 0 {
            bytes.extend_from_slice(b"\r\n\r\n");
        }
        let reply = raw_request(gw.ingress, bytes)
            .await
            .unwrap_or_else(|| panic!("#{i}: closed without an answer"));
        assert!((400..500).contains(&reply.status), "#{i}: {reply:?}");
    }

    // Clients that never finish: silent, half a request line, headers without their end,
    // a body shorter than announced, a chunked body that never ends.
    let stalls: [&[u8]; 5] = [
        b"",
        b"POST /hooks/g HT",
        b"POST /hooks/g HTTP/1.1\r\nHost: gw\r\nContent-Le",
        b"POST /hooks/g HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\n{\"type\":",
        b"POST /hooks/g HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"typ\r\n",
    ];
    let mut stalled = Vec::new();
    for _ in 0..10 {
        for bytes in stalls {
            let mut s = tokio::net::TcpStream::connect(gw.ingress).await.unwrap();
            s.write_all(bytes).await.unwrap();
            stalled.push(s);
        }
    }

    // Everyone else is served promptly meanwhile, in parallel.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..20 {
        let url = gw.url("/hooks/g");
        tasks.push(tokio::spawn(async move {
            post_json(&url, &format!(r#"{{"type":"live","n":{n}}}"#)).await
        }));
    }
    for t in tasks {
        let reply = t.await.unwrap();
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "served in {:?} while {} clients stalled",
        started.elapsed(),
        stalled.len()
    );
    // 20 callbacks x 2 routes.
    sink.wait_for(40, WAIT).await;
    assert_still_serving(&gw, &sink).await;
    drop(stalled);
    assert_still_serving(&gw, &sink).await;
}
