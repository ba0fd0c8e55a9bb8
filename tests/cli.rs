//! `switchyard check` and `switchyard explain`, as a platform engineer runs them.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

fn repo_rules() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("rules")
        .display()
        .to_string()
}

fn sample_path(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/samples")
        .join(name)
        .display()
        .to_string()
}

/// Splits `FILE:LINE:COL: message`; `None` when the line is not in that form.
fn located(line: &str) -> Option<(&str, u32, u32, &str)> {
    let (location, message) = line.split_once(": ")?;
    let mut parts = location.rsplitn(3, ':');
    let col = parts.next()?.parse().ok()?;
    let line_no = parts.next()?.parse().ok()?;
    let file = parts.next()?;
    Some((file, line_no, col, message))
}

#[test]
fn check_prints_a_summary_of_good_rules_and_exits_0() {
    let rules = RulesDir::new();
    rules.write(
        "sources.yaml",
        r#"sources:
  im:
    path: /im/tencent
    dialect: tencent
    app_ids: ["1400000000", "1400000001"]
    token: ${SWITCHYARD_CLI_TEST_TOKEN:-secret}
  oim:
    path: /im/openim
    dialect: openim
  billing:
    path: /hooks/billing
    dialect: generic
    command: header.x-event
"#,
    );
    rules.write(
        "targets.yml",
        r#"targets:
  profile:
    url: http://127.0.0.1:7001/im/{command}
    timeout: 5s
    signing_secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
  audit:
    url: http://127.0.0.1:7003/ingest
"#,
    );
    rules.write(
        "routes.yaml",
        r#"routes:
  - name: nick
    sources: [im]
    commands: ["Profile.*"]
    filter_file: scripts/nick.rhai
    transform: '#{user: body.From_Account}'
    to: [profile, audit]
  - name: everything
    to: [audit]
"#,
    );
    rules.write(
        "scripts/nick.rhai",
        "body.ProfileItem.some(|i| i.Tag == \"Tag_Profile_IM_Nick\")\n",
    );
    // Not rule files: ignored.
    rules.write("README.md", "not yaml: [");
    rules.write("tests/case.yaml", "not: [a rule file");

    let (code, out, err) = run_cli(
        &["check", "--rules", &rules.path().display().to_string()],
        None,
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    let line = |prefix: &str| -> &str {
        let found: Vec<&&str> = lines.iter().filter(|l| l.starts_with(prefix)).collect();
        assert_eq!(found.len(), 1, "one line for {prefix:?} in:\n{out}");
        found[0]
    };
    let im = line("source im:");
    assert!(im.contains("/im/tencent") && im.contains("tencent"), "{im}");
    assert!(im.contains("1400000000,1400000001"), "{im}");
    assert!(im.contains("Sign required"), "{im}");
    assert!(line("source oim:").contains("/im/openim"));
    assert!(line("source billing:").contains("header.x-event"));
    let profile = line("target profile:");
    assert!(
        profile.contains("http://127.0.0.1:7001/im/{command}"),
        "{profile}"
    );
    assert!(profile.contains("signed"), "{profile}");
    assert!(line("target audit:").contains("http://127.0.0.1:7003/ingest"));
    let nick = line("route nick:");
    assert!(nick.contains("Profile.*"), "{nick}");
    assert!(nick.contains("scripts/nick.rhai"), "{nick}");
    assert!(nick.ends_with("-> profile, audit"), "{nick}");
    assert!(line("route everything:").ends_with("-> audit"));
    assert_eq!(
        *lines.last().unwrap(),
        "ok: 3 sources, 2 targets, 2 routes from 3 files"
    );
    assert_eq!(lines.len(), 3 + 2 + 2 + 1, "{out}");

    // The rules directory may also come from SWITCHYARD_RULES, like `serve`.
    let (code, out2, _) = run_cli_env(
        &["check"],
        None,
        &[("SWITCHYARD_RULES", &rules.path().display().to_string())],
    );
    assert_eq!(code, 0);
    assert_eq!(out2, out);
}

#[test]
fn check_reports_every_error_with_its_location_and_exits_1() {
    let rules = RulesDir::new();
    let a = rules.write(
        "a.yaml",
        r#"sources:
  t:
    path: /t
    dialect: tencent
    app_ids: ["1"]
    max_clock_skew: 5 minutes
    colour: red
targets:
  s:
    url: http://127.0.0.1:1/x
routes:
  - name: r1
    to: [nope]
  - name: dup
    filter: 'body.x == '
    to: [s]
"#,
    );
    let b = rules.write(
        "b.yaml",
        r#"targets:
  s2:
    url: "${SWITCHYARD_CLI_TEST_UNSET_VAR}/x"
routes:
  - name: dup
    to: [s]
  - name: file-script
    transform_file: scripts/bad.rhai
    to: [s]
"#,
    );
    let c = rules.write(
        "c.yml",
        r#"sources:
  x:
    path: /x
    dialect: xmpp
  y:
    path: /y
    dialect: generic
    max_body: lots
targets:
  s:
    url: http://127.0.0.1:2/x
"#,
    );
    let script = rules.write("scripts/bad.rhai", "let a = 1;\nlet b = ;\n#{a: a}\n");
    let (a, b, c, script) = (
        a.display().to_string(),
        b.display().to_string(),
        c.display().to_string(),
        script.display().to_string(),
    );
    let expected: Vec<(String, u32, u32, Vec<&str>)> = vec![
        (a.clone(), 7, 5, vec!["unknown key", "colour"]),
        (a.clone(), 6, 21, vec!["5 minutes", "duration"]),
        (a.clone(), 13, 10, vec!["unknown target", "nope"]),
        // Just after `body.x == ` on line 15: the script is incomplete.
        (a.clone(), 15, 24, vec!["script"]),
        (
            b.clone(),
            3,
            10,
            vec!["SWITCHYARD_CLI_TEST_UNSET_VAR", "not set"],
        ),
        (b.clone(), 5, 11, vec!["duplicate", "dup", &a]),
        (c.clone(), 4, 14, vec!["dialect", "xmpp"]),
        (c.clone(), 8, 15, vec!["lots", "size"]),
        (c.clone(), 10, 3, vec!["duplicate", "`s`", &a]),
        (script.clone(), 2, 9, vec!["script"]),
    ];
    let (code, out, err) = run_cli_env(
        &["check", "--rules", &rules.path().display().to_string()],
        None,
        &[],
    );
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    // Every line is FILE:LINE:COL: message.
    let errors: Vec<(&str, u32, u32, &str)> = out
        .lines()
        .map(|l| located(l).unwrap_or_else(|| panic!("not FILE:LINE:COL: message: {l:?}")))
        .collect();
    for (file, line, col, words) in &expected {
        let hit = errors
            .iter()
            .find(|(f, l, c, _)| f == file && l == line && c == col)
            .unwrap_or_else(|| panic!("no error at {file}:{line}:{col} in:\n{out}"));
        for word in words {
            assert!(
                hit.3.contains(word),
                "{file}:{line}:{col}: {:?} lacks {word:?}",
                hit.3
            );
        }
    }
    assert_eq!(
        errors.len(),
        expected.len(),
        "unexpected extra errors:\n{out}"
    );
    assert!(
        err.contains(&format!("{} error(s)", expected.len())),
        "{err}"
    );
}

/// YAML 1.1 read `y`, `on` and `no` as booleans; rule files are YAML 1.2, where they are the
/// words themselves, and a boolean setting written `yes` is an error saying what it needs.
#[test]
fn check_reads_yes_no_on_and_y_as_words_and_refuses_them_for_booleans() {
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        "sources:\n  g: {path: /g, dialect: generic, command: body.type}\n\
         targets:\n  t: {url: 'http://127.0.0.1:1/'}\n\
         routes:\n  - {name: no, commands: [y, on], to: [t]}\n",
    );
    let dir = rules.path().display().to_string();
    let (code, out, err) = run_cli_env(&["check", "--rules", &dir], None, &[]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("route no: sources *, commands y,on -> t"),
        "{out}"
    );

    let file = rules.write(
        "r.yaml",
        "sources:\n  g: {path: /g, dialect: generic, command: body.type}\n\
         targets:\n  t: {url: 'http://127.0.0.1:1/'}\n\
         routes:\n  - {name: r, respond: yes, to: [t]}\n",
    );
    let (code, out, err) = run_cli_env(&["check", "--rules", &dir], None, &[]);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    let at = format!("{}:6:", file.display());
    assert!(
        out.lines()
            .any(|l| l.starts_with(&at) && l.contains("respond must be true or false")),
        "{out}"
    );
}

#[test]
fn check_passes_on_the_repository_rules() {
    let (code, out, err) = run_cli_env(
        &["check", "--rules", &repo_rules()],
        None,
        &[
            ("TENCENT_CALLBACK_TOKEN", ""),
            ("PROFILE_SIGNING_SECRET", ""),
        ],
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let last = out.lines().last().unwrap();
    assert!(last.starts_with("ok: "), "{out}");
    // One line per source, target and route, as counted in the closing line.
    let count = |what: &str| {
        out.lines()
            .filter(|l| l.starts_with(&format!("{what} ")))
            .count()
    };
    let closing = format!(
        "ok: {} sources, {} targets, {} routes from",
        count("source"),
        count("target"),
        count("route")
    );
    assert!(last.starts_with(&closing), "{last:?} vs {closing:?}");
    for route in ["profile-nick-changes", "audit-everything"] {
        assert!(out.contains(&format!("route {route}:")), "{out}");
    }
}

/// Runs `explain` on the repository's rules with every target pointed at `sink`.
fn explain(sink: &Sink, args: &[&str], stdin: Option<&str>, token: &str) -> (i32, String, String) {
    let rules = repo_rules();
    let mut all = vec!["explain", "--rules", &rules];
    all.extend_from_slice(args);
    let url = sink.url();
    run_cli_env(
        &all,
        stdin,
        &[
            ("PROFILE_SVC_URL", &url),
            ("GROUP_SVC_URL", &url),
            ("AUDIT_URL", &url),
            ("TENCENT_SDKAPPID", APP_ID),
            ("TENCENT_CALLBACK_TOKEN", token),
            ("PROFILE_SIGNING_SECRET", ""),
            ("GROUP_SVC_TOKEN", "group-token"),
        ],
    )
}

fn route<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == name)
        .unwrap_or_else(|| panic!("no route {name} in {report:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_matches_misses_and_deliveries_and_sends_nothing() {
    let sink = Sink::start().await;
    let query = format!(
        "SdkAppid={APP_ID}&CallbackCommand=Profile.CallbackPortraitSet&contenttype=json&ClientIP=127.0.0.1&OptPlatform=RESTAPI"
    );
    let file = sample_path("tencent/Profile.CallbackPortraitSet.json");
    let (code, out, err) = explain(
        &sink,
        &["--source", "tencent-im", "--query", &query, &file],
        None,
        "",
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let report: Value = serde_json::from_str(&out).expect("explain prints JSON");
    assert_eq!(report["command"], "Profile.CallbackPortraitSet");
    assert_eq!(report["source"], "tencent-im");
    assert_eq!(report["dialect"], "tencent");
    assert_eq!(report["app_id"], APP_ID);
    assert_eq!(report["authorization"]["ok"], true);

    // Matched: filtered, transformed, delivered to the profile service.
    let nick = route(&report, "profile-nick-changes");
    assert_eq!(nick["matched"], true, "{nick:#}");
    assert_eq!(nick["filter"], true, "{nick:#}");
    let deliveries = nick["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 1, "{nick:#}");
    let d = &deliveries[0];
    assert_eq!(d["target"], "profile-svc");
    assert_eq!(d["method"], "POST");
    assert_eq!(
        d["url"],
        format!("{}/im/Profile.CallbackPortraitSet", sink.url())
    );
    assert_eq!(d["headers"]["content-type"], "application/json");
    assert_eq!(d["headers"]["x-switchyard-route"], "profile-nick-changes");
    assert_eq!(d["headers"]["x-switchyard-source"], "tencent-im");
    assert_eq!(
        d["headers"]["x-switchyard-command"],
        "Profile.CallbackPortraitSet"
    );
    assert!(d["headers"]["webhook-id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(
        d["body"],
        json!({
            "user_id": "id1",
            "changes": {"nick": "nick1", "gender": "Gender_Type_Male"},
            "at": 1656921052497u64,
            "app_id": APP_ID,
            "origin": "tencent",
        })
    );

    // Not matched, each with its reason.
    let openim = route(&report, "openim-user-updates");
    assert_eq!(openim["matched"], false);
    assert!(
        openim["reason"]
            .as_str()
            .unwrap()
            .contains("source `tencent-im`"),
        "{openim:#}"
    );
    assert_eq!(openim["deliveries"], json!([]));
    let group = route(&report, "group-and-account-changes");
    assert_eq!(group["matched"], false);
    let reason = group["reason"].as_str().unwrap();
    assert!(
        reason.contains("Profile.CallbackPortraitSet") && reason.contains("Group.CallbackAfter*"),
        "{reason}"
    );

    // Matched without scripts: the original body, as is, to the audit log.
    let audit = route(&report, "audit-everything");
    assert_eq!(audit["matched"], true);
    let d = &audit["deliveries"][0];
    assert_eq!(d["target"], "audit");
    assert_eq!(d["url"], format!("{}/ingest", sink.url()));
    let original: Value =
        serde_json::from_str(&sample("tencent/Profile.CallbackPortraitSet.json")).unwrap();
    assert_eq!(d["body"], original);
    assert_eq!(report["deliveries"], 2);

    // A dry run: nothing reached the targets.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        sink.count(),
        0,
        "explain must not send: {:#?}",
        sink.received()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_reads_stdin_and_shows_a_filter_that_said_no() {
    let sink = Sink::start().await;
    // No nickname in the change: the profile route's filter returns false.
    let body = r#"{"CallbackCommand":"Profile.CallbackPortraitSet","From_Account":"id2","EventTime":"1656921052497","ProfileItem":[{"Tag":"Tag_Profile_IM_Gender","Value":"Gender_Type_Female"}]}"#;
    let query = format!("SdkAppid={APP_ID}&CallbackCommand=Profile.CallbackPortraitSet");
    let (code, out, err) = explain(
        &sink,
        &["--source", "tencent-im", "--query", &query, "-"],
        Some(body),
        "",
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let nick = route(&report, "profile-nick-changes");
    assert_eq!(nick["matched"], false);
    assert_eq!(nick["filter"], false);
    assert!(
        nick["reason"].as_str().unwrap().contains("filter"),
        "{nick:#}"
    );
    assert_eq!(nick["deliveries"], json!([]));
    assert_eq!(route(&report, "audit-everything")["matched"], true);
    assert_eq!(report["deliveries"], 1);
    assert_eq!(sink.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_an_openim_callback_with_path_suffix_and_headers() {
    let sink = Sink::start().await;
    let file = sample_path("openim/callbackAfterUpdateUserInfoCommand.json");
    let (code, out, err) = explain(
        &sink,
        &[
            "--source",
            "openim",
            "--path-suffix",
            "callbackAfterUpdateUserInfoCommand",
            "--header",
            "operationID: op-1",
            "--header",
            "Content-Type: application/json; charset=utf-8",
            &file,
        ],
        None,
        "",
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["command"], "callbackAfterUpdateUserInfoCommand");
    assert_eq!(report["dialect"], "openim");
    let updates = route(&report, "openim-user-updates");
    assert_eq!(updates["matched"], true, "{updates:#}");
    let d = &updates["deliveries"][0];
    assert_eq!(
        d["url"],
        format!("{}/im/callbackAfterUpdateUserInfoCommand", sink.url())
    );
    assert_eq!(d["body"]["user_id"], "user123");
    assert_eq!(d["body"]["nick"], "John Doe");
    assert_eq!(d["body"]["origin"], "openim");
    // The untransformed copy keeps the sender's content type.
    let audit = &route(&report, "audit-everything")["deliveries"][0];
    assert_eq!(
        audit["headers"]["content-type"],
        "application/json; charset=utf-8"
    );
    assert_eq!(route(&report, "profile-nick-changes")["matched"], false);
    assert_eq!(sink.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_reports_what_the_server_would_refuse() {
    let sink = Sink::start().await;
    let query = format!("SdkAppid={APP_ID}&CallbackCommand=Profile.CallbackPortraitSet");
    let body = sample("tencent/Profile.CallbackPortraitSet.json");

    // With a token and no Sign, the report says the server would answer 401.
    let (code, out, err) = explain(
        &sink,
        &["--source", "tencent-im", "--query", &query, "-"],
        Some(&body),
        "a-token",
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["authorization"]["ok"], false);
    assert_eq!(report["authorization"]["status"], 401);

    // A body that is not JSON: the dialect's 400, and exit 1.
    let (code, _, err) = explain(
        &sink,
        &["--source", "tencent-im", "--query", &query, "-"],
        Some("not json"),
        "",
    );
    assert_eq!(code, 1);
    assert!(err.contains("400") && err.contains("JSON"), "{err}");

    // An unknown source names the ones there are.
    let (code, _, err) = explain(&sink, &["--source", "nope", "-"], Some("{}"), "");
    assert_eq!(code, 1);
    assert!(err.contains("nope") && err.contains("tencent-im"), "{err}");

    // A malformed --header.
    let (code, _, err) = explain(
        &sink,
        &["--source", "openim", "--header", "no colon", "-"],
        Some("{}"),
        "",
    );
    assert_eq!(code, 1);
    assert!(err.contains("no colon"), "{err}");
    assert_eq!(sink.count(), 0);
}
