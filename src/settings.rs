//! Command-line flags of `serve`, each also read from `SWITCHYARD_<FLAG>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::rules::text::{parse_duration, parse_size};

/// Where deliveries wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SpoolKind {
    /// Durable, on disk in --data-dir (redb); survives restarts and crashes
    Redb,
    /// In memory only: lost at exit; for tests and comparisons
    Memory,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Settings of a running gateway.
#[derive(Clone, Debug, clap::Args)]
pub struct Settings {
    /// Rule directory
    #[arg(
        long = "rules",
        value_name = "DIR",
        env = "SWITCHYARD_RULES",
        default_value = "rules"
    )]
    pub rules_dir: PathBuf,
    /// Callback ingress address
    #[arg(
        long,
        value_name = "ADDR",
        env = "SWITCHYARD_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub listen: SocketAddr,
    /// Health, metrics and admin API address; keep it private
    #[arg(
        long,
        value_name = "ADDR",
        env = "SWITCHYARD_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub admin_listen: SocketAddr,
    /// Directory of the embedded spool
    #[arg(
        long,
        value_name = "DIR",
        env = "SWITCHYARD_DATA_DIR",
        default_value = "data"
    )]
    pub data_dir: PathBuf,
    /// Log format on stderr
    #[arg(
        long,
        value_enum,
        env = "SWITCHYARD_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Where deliveries wait
    #[arg(long, value_enum, env = "SWITCHYARD_SPOOL", default_value = "redb")]
    pub spool: SpoolKind,
    /// Most bytes of queued deliveries; beyond it callbacks are answered 503
    #[arg(long, value_name = "SIZE", env = "SWITCHYARD_MAX_SPOOL", default_value = "1GiB", value_parser = parse_size)]
    pub max_spool: u64,
    /// How long dead letters are kept before they are dropped
    #[arg(long, value_name = "DURATION", env = "SWITCHYARD_DEAD_LETTER_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub dead_letter_retention: Duration,
    /// How long shutdown waits for requests and delivery attempts in progress
    #[arg(long, value_name = "DURATION", env = "SWITCHYARD_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Worker threads that take and answer callbacks, and as many again that deliver them
    /// [default: half the cores, rounded up]
    #[arg(long, value_name = "N", env = "SWITCHYARD_WORKERS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,
}

impl Settings {
    /// Worker threads of each of the ingress's and the delivery's runtimes: `--workers`, or half
    /// the cores this process may use (rounded up). Together with the spool writer that is about
    /// one busy thread per core; one per core in each runtime would put two on every core, and on
    /// two shared cores the extra thread switches cost more than they gave (docs/benchmarks.md).
    pub fn worker_threads(&self) -> usize {
        self.workers.map(usize::from).unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| n.get().div_ceil(2))
        })
    }
}
