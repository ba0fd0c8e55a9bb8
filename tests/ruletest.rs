//! `switchyard test`: rule tests as a platform team writes and runs them.

mod support;

use std::path::Path;
use std::time::Duration;

use support::*;

/// A signed Tencent source, a filtered + transformed route, a plain route and a synchronous one,
/// all pointing at `sink`.
fn rules_for(sink: &str) -> RulesDir {
    let dir = RulesDir::new();
    dir.write(
        "rules.yaml",
        &format!(
            r#"sources:
  im:
    path: /im
    dialect: tencent
    app_ids: ["1400000000"]
    token: secret-token
    on_respond_failure: deny
targets:
  profiles: {{url: '{sink}/profiles/{{command}}'}}
  audit: {{url: '{sink}/audit'}}
  moderation: {{url: '{sink}/moderate'}}
routes:
  - name: nick
    commands: [Profile.CallbackPortraitSet]
    filter: 'body.ProfileItem.some(|i| i.Tag == "Tag_Profile_IM_Nick")'
    transform: '#{{user: body.From_Account, nick: body.ProfileItem[0].Value, event: event_id}}'
    to: [profiles]
  - name: moderate
    commands: ["*.CallbackBeforeSendMsg"]
    respond: true
    response_transform: '#{{ActionStatus: "OK", ErrorCode: if response.ok {{ 0 }} else {{ 1 }}, ErrorInfo: response.why ?? ""}}'
    to: [moderation]
  - name: audit-all
    to: [audit]
"#
        ),
    );
    dir
}

const PASSING: &str = r#"
tests:
  - name: nick changes are reshaped
    source: im
    request:
      query: {SdkAppid: "1400000000", CallbackCommand: Profile.CallbackPortraitSet}
      sign: true
      body: {From_Account: u1, ProfileItem: [{Tag: Tag_Profile_IM_Nick, Value: Ann}]}
    expect:
      routes: [nick, audit-all]
      deliveries:
        - target: profiles
          url: URL/profiles/Profile.CallbackPortraitSet
          body: {user: u1, nick: Ann, event: 00000000-0000-7000-8000-000000000000}
        - target: audit
          body_file: bodies/nick.json
  - name: a blocked message gets the moderation answer
    source: im
    request:
      query: {SdkAppid: "1400000000", CallbackCommand: Group.CallbackBeforeSendMsg}
      sign: true
      body: {GroupId: g1, MsgBody: []}
    respond_with: {status: 200, body: {ok: false, why: spam}}
    expect:
      deliveries:
        - {target: moderation, body_includes: {GroupId: g1}}
        - {target: audit}
      answer: {ActionStatus: OK, ErrorCode: 1, ErrorInfo: spam}
  - name: an unreachable moderation service denies
    source: im
    request:
      query: {SdkAppid: "1400000000", CallbackCommand: C2C.CallbackBeforeSendMsg}
      sign: true
      body: {From_Account: a}
    respond_with: {unreachable: true}
    expect:
      answer_includes: {ErrorCode: 1}
  - name: an unsigned callback is refused
    source: im
    request:
      query: {SdkAppid: "1400000000", CallbackCommand: Profile.CallbackPortraitSet}
      body: {From_Account: u1, ProfileItem: []}
    expect:
      rejected: {status: 401, reason_includes: Sign}
      answer_includes: {ActionStatus: FAIL}
      nothing_delivered: true
"#;

fn write_passing(dir: &RulesDir, sink: &str) {
    dir.write("tests/passing.yaml", &PASSING.replace("URL", sink));
    dir.write(
        "tests/bodies/nick.json",
        r#"{"From_Account":"u1","ProfileItem":[{"Tag":"Tag_Profile_IM_Nick","Value":"Ann"}]}"#,
    );
}

fn test_cmd(dir: &Path, extra: &[&str]) -> (i32, String, String) {
    let dir = dir.display().to_string();
    let mut args = vec!["test", "--rules", dir.as_str()];
    args.extend_from_slice(extra);
    run_cli(&args, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passing_cases_print_ok_and_exit_0_and_nothing_is_sent() {
    let sink = Sink::start().await;
    let dir = rules_for(&sink.url());
    write_passing(&dir, &sink.url());
    let (code, out, err) = test_cmd(dir.path(), &[]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "test nick changes are reshaped ... ok",
            "test a blocked message gets the moderation answer ... ok",
            "test an unreachable moderation service denies ... ok",
            "test an unsigned callback is refused ... ok",
            "4 passed, 0 failed",
        ],
        "{out}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sink.count(), 0, "a rule test must send nothing");

    // A name filter runs only the cases whose name contains it.
    let (code, out, _) = test_cmd(dir.path(), &["moderation"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "test a blocked message gets the moderation answer ... ok",
            "test an unreachable moderation service denies ... ok",
            "2 passed, 0 failed",
        ]
    );
}

#[test]
fn failing_cases_show_what_differs_and_exit_1() {
    let dir = rules_for("http://127.0.0.1:9");
    dir.write(
        "tests/failing.yaml",
        r#"
tests:
  - name: wrong nick
    source: im
    request:
      query: {SdkAppid: "1400000000", CallbackCommand: Profile.CallbackPortraitSet}
      sign: true
      body: {From_Account: u1, ProfileItem: [{Tag: Tag_Profile_IM_Nick, Value: Ann}]}
    expect:
      routes: [nick]
      deliveries:
        - target: profiles
          body: {user: u1, nick: Bob, event: 00000000-0000-7000-8000-000000000000}
  - name: right answer
    source: im
    request:
      query: {SdkAppid: "1400000000", CallbackCommand: Group.CallbackBeforeSendMsg}
      sign: true
      body: {GroupId: g1}
    respond_with: {body: {ok: true}}
    expect:
      answer: {ActionStatus: OK, ErrorCode: 0, ErrorInfo: ""}
  - name: no answer mocked
    source: im
    request:
      query: {SdkAppid: "1400000000", CallbackCommand: Group.CallbackBeforeSendMsg}
      sign: true
      body: {GroupId: g1}
    expect:
      deliveries: [{target: moderation}, {target: audit}]
      answer: {ActionStatus: OK, ErrorCode: 0, ErrorInfo: ""}
  - name: a script that fails
    source: im
    request:
      query: {SdkAppid: "1400000000", CallbackCommand: Profile.CallbackPortraitSet}
      sign: true
      body: {From_Account: u1}
    expect:
      routes: [audit-all]
"#,
    );
    let (code, out, err) = test_cmd(dir.path(), &[]);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    let expected_lines = [
        "test wrong nick ... FAILED (",
        "    routes fired: expected [\"nick\"], actual [\"nick\", \"audit-all\"]",
        "      not expected: [\"audit-all\"]",
        "    the delivery to profiles: body differs:",
        "      .nick: expected \"Bob\", actual \"Ann\"",
        "    a delivery was not expected: to audit (route audit-all) http://127.0.0.1:9/audit:",
        "test right answer ... ok",
        "test no answer mocked ... FAILED (",
        "    route moderate answers this callback synchronously: give `respond_with`",
        "test a script that fails ... FAILED (",
        "    a script failed on route(s) nick; add `dead_letters: [nick]` if that is expected",
    ];
    let mut lines = out.lines();
    for want in expected_lines {
        assert!(
            lines.any(|l| l.starts_with(want)),
            "no line starting with {want:?} (in order) in:\n{out}"
        );
    }
    assert_eq!(out.lines().last(), Some("1 passed, 3 failed"), "{out}");
    // Without `respond_with` only the answer cannot be checked: the ask is still a delivery.
    assert!(!out.contains("the delivery to moderation"), "{out}");
    assert!(
        out.contains("failing.yaml:3)"),
        "a failure names FILE:LINE of its case: {out}"
    );
}

#[test]
fn broken_test_files_are_reported_with_their_location_and_fail_the_run() {
    let dir = rules_for("http://127.0.0.1:9");
    write_passing(&dir, "http://127.0.0.1:9");
    dir.write(
        "tests/zz-broken.yaml",
        "tests:\n  - name: typo\n    source: im\n    reqest: {body: {}}\n    expect: {routes: []}\n",
    );
    let (code, out, _) = test_cmd(dir.path(), &[]);
    assert_eq!(code, 1, "{out}");
    let first = out.lines().next().unwrap_or_default();
    assert!(
        first.ends_with("zz-broken.yaml:4:5: unknown key `reqest` in a test case (expected one of: name, source, request, respond_with, expect)"),
        "{out}"
    );
    assert!(
        out.contains("test nick changes are reshaped ... ok"),
        "{out}"
    );
    assert_eq!(out.lines().last(), Some("4 passed, 1 failed"), "{out}");
}

#[test]
fn rules_that_do_not_load_run_no_case() {
    let dir = rules_for("http://127.0.0.1:9");
    write_passing(&dir, "http://127.0.0.1:9");
    dir.write("more.yaml", "routes:\n  - name: x\n    to: [nowhere]\n");
    let (code, out, err) = test_cmd(dir.path(), &[]);
    assert_eq!(code, 1);
    assert!(out.contains("more.yaml:3:"), "{out}");
    assert!(err.contains("no case ran"), "{err}");
    assert!(!out.contains("passed"), "{out}");
}

#[test]
fn the_example_rules_pass_their_own_tests() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let (code, out, err) = test_cmd(&rules, &[]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let last = out.lines().last().unwrap_or_default();
    let passed: usize = last
        .strip_suffix(" passed, 0 failed")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("closing line: {last:?}"));
    // Every example route is exercised by at least one case.
    assert!(passed >= 5, "{out}");
    let engine_rules = std::fs::read_to_string(rules.join("routes.yaml")).unwrap();
    let tests: String = std::fs::read_dir(rules.join("tests"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "yaml"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    for line in engine_rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- name: ") {
            assert!(
                tests.contains(name),
                "route {name} has no rule test in rules/tests"
            );
        }
    }
}
