mod support;
use std::time::Duration;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_fans_out() {
    let sink = Sink::start().await;
    let rules = RulesDir::new();
    rules.write(
        "r.yaml",
        &format!(
            "sources:\n  t: {{path: /im/tencent, dialect: tencent, app_ids: ['{APP_ID}']}}\ntargets:\n  s: {{url: '{}/x'}}\nroutes:\n  - {{name: all, to: [s]}}\n",
            sink.url()
        ),
    );
    let gw = Gateway::start(rules.path());
    let body = sample("tencent/Profile.CallbackPortraitSet.json");
    let reply = post_json(
        &gw.url(&format!(
            "/im/tencent?{}",
            tencent_query("Profile.CallbackPortraitSet", None)
        )),
        &body,
    )
    .await;
    assert_eq!(reply.status, 200);
    let got = sink.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got[0].body, body.as_bytes());
}
