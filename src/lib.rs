//! switchyard: a callback gateway for IM backends.
//!
//! A callback travels one way: `ingress` → `dialect` → `router` → `spool` → `delivery`.
//! `rules` loads and validates the rule set that `reload` swaps in whole; `script` is the one
//! Rhai engine; `admin` serves health, metrics and state. [`run`] starts all of it under one
//! shutdown signal.

pub mod admin;
pub mod delivery;
pub mod dialect;
pub mod dlq;
pub mod explain;
pub mod ingress;
pub mod metrics;
pub mod reload;
pub mod respond;
pub mod router;
pub mod rules;
pub mod ruletest;
pub mod sched;
pub mod script;
pub mod server;
pub mod settings;
pub mod spool;

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use settings::{LogFormat, Settings};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the rules in {dir} do not load:\n{errors}")]
    Rules {
        dir: String,
        errors: rules::LoadErrors,
    },
    #[error("cannot open the spool: {0}")]
    Spool(spool::SpoolError),
    #[error("cannot start the delivery threads: {0}")]
    Runtime(std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the gateway until `stop` is cancelled, then shuts down gracefully.
pub async fn run(settings: Settings, stop: CancellationToken) -> Result<(), StartError> {
    let prometheus = metrics::install();
    let engine = Arc::new(script::ScriptEngine::new(
        &settings.rules_dir,
        &script::Limits::default(),
    ));
    let initial =
        rules::load(&settings.rules_dir, &engine).map_err(|errors| StartError::Rules {
            dir: settings.rules_dir.display().to_string(),
            errors,
        })?;
    let rules = Arc::new(ArcSwap::from_pointee(initial));

    let spool: Arc<dyn spool::Spool> = match settings.spool {
        settings::SpoolKind::Redb => {
            let spool = spool::RedbSpool::open(&settings.data_dir, settings.max_spool)
                .map_err(StartError::Spool)?;
            tracing::info!(path = %spool.path.display(), used_bytes = spool.used_bytes(), "spool open");
            Arc::new(spool)
        }
        settings::SpoolKind::Memory => {
            tracing::warn!("the in-memory spool loses queued deliveries at exit");
            Arc::new(spool::MemorySpool::new(settings.max_spool))
        }
    };

    let ingress_listener = bind("ingress", settings.listen).await?;
    let admin_listener = bind("admin", settings.admin_listen).await?;
    let (ingress_addr, admin_addr) = (local_addr(&ingress_listener), local_addr(&admin_listener));

    let delivery_stop = CancellationToken::new();
    let deliverer = delivery::Deliverer::new(
        spool.clone(),
        rules.clone(),
        delivery_stop.clone(),
        settings.worker_threads(),
    )
    .map_err(StartError::Runtime)?;
    deliverer.sync_targets();

    let reloader = {
        let deliverer = deliverer.clone();
        reload::Reloader::new(
            settings.rules_dir.clone(),
            engine.clone(),
            rules.clone(),
            Box::new(move || deliverer.sync_targets()),
        )
    };
    let reload_stop = CancellationToken::new();
    let reload_task = tokio::spawn(reloader.clone().run(reload_stop.clone()));

    let retention_task = tokio::spawn(delivery::expire_dead_letters(
        spool.clone(),
        settings.dead_letter_retention,
        reload_stop.clone(),
    ));

    let admin_stop = CancellationToken::new();
    let upkeep_task = tokio::spawn(metrics::upkeep(prometheus.clone(), admin_stop.clone()));
    let admin = Arc::new(admin::Admin {
        rules: rules.clone(),
        reloader,
        deliverer: deliverer.clone(),
        spool: spool.clone(),
        engine: engine.clone(),
        metrics: prometheus,
    });
    let admin_task = tokio::spawn(server::serve(
        "admin",
        admin_listener,
        server::Limits {
            max_connections: 256,
            ..server::Limits::default()
        },
        admin_stop.clone(),
        settings.shutdown_grace,
        move |req| admin.clone().handle(req),
    ));

    let ingress = Arc::new(ingress::Ingress {
        rules: rules.clone(),
        engine,
        spool,
        deliverer: deliverer.clone(),
    });
    {
        let r = rules.load();
        tracing::info!(
            generation = r.generation,
            sources = r.sources.len(),
            targets = r.targets.len(),
            routes = r.routes.len(),
            dir = %settings.rules_dir.display(),
            "rules loaded"
        );
    }
    tracing::info!(
        ingress = %ingress_addr,
        admin = %admin_addr,
        workers = tokio::runtime::Handle::current().metrics().num_workers(),
        "switchyard started"
    );
    server::serve(
        "ingress",
        ingress_listener,
        server::Limits::default(),
        stop.clone(),
        settings.shutdown_grace,
        move |req| ingress.clone().handle(req),
    )
    .await;

    tracing::info!("ingress closed; finishing delivery attempts in flight");
    reload_stop.cancel();
    deliverer.shutdown(settings.shutdown_grace).await;
    delivery_stop.cancel();
    admin_stop.cancel();
    let _ = reload_task.await;
    let _ = retention_task.await;
    let _ = admin_task.await;
    let _ = upkeep_task.await;
    tracing::info!("switchyard stopped");
    Ok(())
}

async fn bind(name: &str, addr: std::net::SocketAddr) -> Result<TcpListener, StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    tracing::info!(listener = name, addr = %local_addr(&listener), "listening");
    Ok(listener)
}

fn local_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into())
}
