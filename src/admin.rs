//! The admin listener: health, readiness, Prometheus metrics and the rules' state.
//!
//! It reads shared state and never sits in the callback path; bind it to a private address.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::{Method, StatusCode};
use hyper::body::Incoming;
use hyper::Request;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::delivery::Deliverer;
use crate::reload::Reloader;
use crate::rules::RuleSet;
use crate::script::ScriptEngine;
use crate::server::{self, HttpResponse};
use crate::spool::Spool;

pub struct Admin {
    pub rules: Arc<ArcSwap<RuleSet>>,
    pub reloader: Arc<Reloader>,
    pub deliverer: Arc<Deliverer>,
    pub spool: Arc<dyn Spool>,
    pub engine: Arc<ScriptEngine>,
    pub metrics: PrometheusHandle,
}

impl Admin {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> HttpResponse {
        if req.method() != Method::GET {
            return server::json(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "only GET is served here"}).to_string(),
            );
        }
        match req.uri().path() {
            "/healthz" => server::json(StatusCode::OK, r#"{"status":"ok"}"#),
            "/readyz" => self.ready(),
            "/metrics" => {
                self.deliverer.publish_gauges();
                let mut resp = server::json(StatusCode::OK, self.metrics.render());
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            "/admin/rules" => server::json(StatusCode::OK, self.rules_state().to_string()),
            other => server::json(
                StatusCode::NOT_FOUND,
                json!({"error": format!("nothing at {other}")}).to_string(),
            ),
        }
    }

    fn ready(&self) -> HttpResponse {
        let rules = self.rules.load();
        if rules.sources.is_empty() {
            return server::json(
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"status":"not ready","reason":"no sources loaded"}"#,
            );
        }
        server::json(StatusCode::OK, r#"{"status":"ready"}"#)
    }

    fn rules_state(&self) -> serde_json::Value {
        let rules = self.rules.load();
        let status = self.reloader.status();
        json!({
            "generation": rules.generation,
            "loaded_at": rfc3339(rules.loaded_at),
            "dir": rules.dir.display().to_string(),
            "files": rules.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "sources": rules.sources.iter().map(|s| json!({
                "name": &*s.name, "path": s.path, "dialect": s.dialect.as_str(),
            })).collect::<Vec<_>>(),
            "targets": rules.targets.iter().map(|t| json!({
                "name": &*t.name, "url": t.url.as_str(), "method": t.method.as_str(),
            })).collect::<Vec<_>>(),
            "routes": rules.routes.iter().map(|r| json!({
                "name": &*r.name,
                "to": r.to.iter().map(|t| &**t).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "last_reload_at": status.last_attempt_at.map(rfc3339),
            "last_reload_error": status.last_error.map(|f| json!({
                "at": rfc3339(f.at),
                "errors": f.errors,
            })),
        })
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
