//! Criterion benches of the per-callback work: the router (match + filter + transform), the
//! Tencent `Sign` check, and the dialect parse, on the benchmark rule set in `bench/rules`.
//!
//! ```text
//! cargo bench --bench gateway
//! ```

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{HeaderMap, HeaderValue};
use switchyard::dialect::{self, tencent, Callback, Request};
use switchyard::router;
use switchyard::rules::{self, RuleSet, Source};
use switchyard::script::{Limits, ScriptEngine};

const TOKEN: &str = "switchyard-bench-token";
const BODY: &str = r#"{"CallbackCommand":"Profile.CallbackPortraitSet","Operator_Account":"id1","From_Account":"id1","EventTime":1656921052497,"ProfileItem":[{"Tag":"Tag_Profile_IM_Nick","Value":"nick1"},{"Tag":"Tag_Profile_IM_Gender","Value":"Gender_Type_Male"},{"Tag":"Tag_Profile_IM_AllowType","Value":"AllowType_Type_NeedConfirm"},{"Tag":"Tag_Profile_Custom_Data","Value":"your custom data"}]}"#;
const REQUEST_TIME: &str = "1700000000";

fn setup() -> (RuleSet, ScriptEngine) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/rules");
    let engine = ScriptEngine::new(&dir, &Limits::default());
    let rules = rules::load(&dir, &engine).expect("bench/rules loads");
    (rules, engine)
}

fn query() -> String {
    format!(
        "SdkAppid=1400000000&CallbackCommand=Profile.CallbackPortraitSet&contenttype=json\
         &ClientIP=127.0.0.1&OptPlatform=RESTAPI&Sign={}&RequestTime={REQUEST_TIME}",
        tencent::sign(TOKEN, REQUEST_TIME)
    )
}

fn headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("host", HeaderValue::from_static("127.0.0.1:8080"));
    headers.insert("user-agent", HeaderValue::from_static("wrk"));
    headers
}

fn callback(source: &Arc<Source>, query: &str, headers: &HeaderMap) -> Callback {
    let request = Request::new(query, "", headers);
    dialect::parse(
        source,
        request,
        Bytes::from_static(BODY.as_bytes()),
        "01900000-0000-7000-8000-000000000000".into(),
        1_700_000_000_000,
    )
    .expect("the bench callback parses")
}

fn benches(c: &mut Criterion) {
    let (rules, engine) = setup();
    let source = rules.source("tencent-im").expect("source").clone();
    let query = query();
    let headers = headers();
    let cb = callback(&source, &query, &headers);

    // The deliveries this bench measures: the transform's and two untouched copies.
    let check = router::route(&cb, &rules, &engine).deliveries(&cb);
    assert_eq!(
        check.len(),
        3,
        "the bench callback fans out to three targets"
    );

    let mut group = c.benchmark_group("per callback");
    group.throughput(Throughput::Elements(1));
    group.bench_function(
        "router: match + filter + transform, 2 routes, 3 deliveries",
        |b| {
            b.iter(|| {
                let routing = router::route(black_box(&cb), &rules, &engine);
                black_box(routing.deliveries(&cb))
            })
        },
    );
    group.bench_function("Sign check (SHA-256, constant-time compare)", |b| {
        let sign = tencent::sign(TOKEN, REQUEST_TIME);
        b.iter(|| {
            tencent::check_sign(
                black_box(TOKEN),
                black_box(REQUEST_TIME),
                black_box(&sign),
                1_700_000_010,
                86_400,
            )
        })
    });
    group.bench_function("dialect: authorize + parse a Tencent callback", |b| {
        b.iter(|| {
            let request = Request::new(black_box(&query), "", &headers);
            dialect::authorize(&source, &request, 1_700_000_010).expect("authorized");
            black_box(
                dialect::parse(
                    &source,
                    request,
                    Bytes::from_static(BODY.as_bytes()),
                    "01900000-0000-7000-8000-000000000000".into(),
                    1_700_000_000_000,
                )
                .expect("parses"),
            )
        })
    });
    group.finish();
}

criterion_group!(gateway, benches);
criterion_main!(gateway);
