//! Posts every sample callback in `examples/samples/` to a running gateway, the way the vendors do.
//!
//! ```text
//! cargo run --example send_samples                         # to http://127.0.0.1:8080
//! cargo run --example send_samples -- http://gw:8080       # or SWITCHYARD_URL=http://gw:8080
//! ```
//!
//! - `tencent/<Command>.json` → `POST /im/tencent?SdkAppid=…&CallbackCommand=<Command>&contenttype=json
//!   &ClientIP=127.0.0.1&OptPlatform=RESTAPI`, plus `&Sign=…&RequestTime=…` when
//!   `TENCENT_CALLBACK_TOKEN` is set (`SdkAppid` is `TENCENT_SDKAPPID`, default 1400000000).
//! - `openim/<command>.json` → `POST /im/openim/<command>` with an `operationID` header (OpenIM v3.5+).
//!
//! Prints each answer's status and body; exits 1 if any callback was not answered 2xx.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use switchyard::dialect::tencent;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let base = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("SWITCHYARD_URL").ok())
        .unwrap_or_else(|| "http://127.0.0.1:8080".to_string());
    let base = base.trim_end_matches('/');
    let app_id = std::env::var("TENCENT_SDKAPPID").unwrap_or_else(|_| "1400000000".into());
    let token = std::env::var("TENCENT_CALLBACK_TOKEN").unwrap_or_default();
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/samples");
    let client = reqwest::Client::new();
    let mut failed = 0;

    for file in json_files(&samples.join("tencent"))? {
        let command = stem(&file);
        let mut query = form_urlencoded::Serializer::new(String::new());
        query
            .append_pair("SdkAppid", &app_id)
            .append_pair("CallbackCommand", &command)
            .append_pair("contenttype", "json")
            .append_pair("ClientIP", "127.0.0.1")
            .append_pair("OptPlatform", "RESTAPI");
        if !token.is_empty() {
            let time = SystemTime::now()
                .duration_since(UNIX_EPOCH)?
                .as_secs()
                .to_string();
            query
                .append_pair("Sign", &tencent::sign(&token, &time))
                .append_pair("RequestTime", &time);
        }
        let url = format!("{base}/im/tencent?{}", query.finish());
        let request = client
            .post(&url)
            .header("content-type", "application/json")
            .body(std::fs::read(&file)?);
        failed += send(request, &url).await;
    }

    for (n, file) in json_files(&samples.join("openim"))?.iter().enumerate() {
        let url = format!("{base}/im/openim/{}", stem(file));
        let request = client
            .post(&url)
            .header("content-type", "application/json; charset=utf-8")
            .header("operationID", format!("send-samples-{n}"))
            .body(std::fs::read(file)?);
        failed += send(request, &url).await;
    }

    if failed > 0 {
        eprintln!("{failed} callback(s) were not accepted");
        std::process::exit(1);
    }
    Ok(())
}

/// Sends one callback and prints the answer; returns 1 when it was not accepted.
async fn send(request: reqwest::RequestBuilder, url: &str) -> usize {
    println!("POST {url}");
    match request.send().await {
        Ok(response) => {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            println!("  -> {} {body}", status.as_u16());
            usize::from(!status.is_success())
        }
        Err(e) => {
            println!("  -> error: {e} (is the gateway running? `cargo run --release`)");
            1
        }
    }
}

/// The `*.json` files of a folder, by name.
fn json_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    Ok(files)
}

/// The file name without `.json`: the callback command.
fn stem(file: &Path) -> String {
    file.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
