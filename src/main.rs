//! The `switchyard` command line: parse arguments, call the library, map errors to exit codes.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchyard::{dlq, explain, rules, ruletest, script, LogFormat, Settings};
use tokio_util::sync::CancellationToken;

// Every callback allocates and frees many small buffers across threads; mimalloc does that with
// less CPU and less fragmentation than the system allocator. (.cargo/config.toml builds it to
// commit memory as it is used, not a whole arena up front, so an idle gateway stays small.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "A callback gateway for IM backends"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Settings,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default)
    Serve(Settings),
    /// Load and validate the rules exactly as `serve` would
    Check(RulesDir),
    /// Show, as JSON, what the rules would do with one callback; sends nothing
    Explain {
        #[command(flatten)]
        rules: RulesDir,
        /// Source the callback arrives on
        #[arg(long)]
        source: String,
        /// Path after the source's path (openim: the command)
        #[arg(long, default_value = "")]
        path_suffix: String,
        /// Query string, e.g. 'SdkAppid=1400000000&CallbackCommand=Profile.CallbackPortraitSet'
        #[arg(long, default_value = "")]
        query: String,
        /// Request header, 'Name: value' (repeatable)
        #[arg(long = "header", value_name = "'K: V'")]
        headers: Vec<String>,
        /// Body file, or - for standard input
        #[arg(default_value = "-")]
        file: String,
    },
    /// Run the rule tests in DIR/tests/*.yaml; sends nothing
    Test {
        #[command(flatten)]
        rules: RulesDir,
        /// Run only the cases whose name contains this text
        filter: Option<String>,
    },
    /// Dead letters: list, show, replay, drop, through the running server's admin API
    Dlq(dlq::DlqArgs),
}

/// `--rules DIR` of the commands that only read the rules.
#[derive(clap::Args)]
struct RulesDir {
    /// Rule directory
    #[arg(
        long = "rules",
        value_name = "DIR",
        env = "SWITCHYARD_RULES",
        default_value = "rules"
    )]
    dir: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(settings)) => serve(settings),
        Some(Command::Check(rules)) => check(&rules.dir),
        Some(Command::Test { rules, filter }) => test(&rules.dir, filter.as_deref()),
        Some(Command::Dlq(args)) => match dlq::run(&args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Explain {
            rules,
            source,
            path_suffix,
            query,
            headers,
            file,
        }) => {
            let input = read_body(&file).map(|body| explain::Input {
                source,
                path_suffix,
                query,
                headers,
                body: body.into(),
            });
            match input.and_then(|i| run_explain(&rules.dir, i)) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn serve(settings: Settings) -> ExitCode {
    init_logging(settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.worker_threads())
        .on_thread_start(switchyard::sched::prompt)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let stop = CancellationToken::new();
        tokio::spawn(wait_for_stop_signal(stop.clone()));
        match switchyard::run(settings, stop).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn wait_for_stop_signal(stop: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                stop.cancel();
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    stop.cancel();
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SWITCHYARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        // The event's own `target` field (a delivery target) must not be shadowed by the
        // module path tracing would add under the same key.
        LogFormat::Json => builder.json().flatten_event(true).with_target(false).init(),
    }
}

fn check(dir: &std::path::Path) -> ExitCode {
    let engine = script::ScriptEngine::new(dir, &script::Limits::default());
    match rules::load(dir, &engine) {
        Ok(rules) => {
            for line in rules.summary() {
                println!("{line}");
            }
            println!(
                "ok: {} sources, {} targets, {} routes from {} files",
                rules.sources.len(),
                rules.targets.len(),
                rules.routes.len(),
                rules.files.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                println!("{e}");
            }
            eprintln!("{} error(s) in {}", errors.0.len(), dir.display());
            ExitCode::FAILURE
        }
    }
}

fn test(dir: &std::path::Path, filter: Option<&str>) -> ExitCode {
    let Some((rules, engine)) = load_rules(dir) else {
        eprintln!("the rules in {} do not load, so no case ran", dir.display());
        return ExitCode::FAILURE;
    };
    let loaded = ruletest::load_cases(dir);
    for e in &loaded.errors {
        println!("{e}");
    }
    if loaded.cases.is_empty() && loaded.errors.is_empty() {
        eprintln!(
            "no test cases in {}",
            dir.join("tests").join("*.yaml").display()
        );
    }
    let mut out = std::io::stdout().lock();
    let summary = match ruletest::run(&rules, &engine, &loaded.cases, filter, &mut out) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A case that cannot be read counts as a failure: it did not run.
    let failed = summary.failed + loaded.broken;
    println!("{} passed, {failed} failed", summary.passed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn read_body(file: &str) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    if file == "-" {
        std::io::stdin()
            .read_to_end(&mut body)
            .context("reading the body from standard input")?;
    } else {
        body = std::fs::read(file).with_context(|| format!("reading {file}"))?;
    }
    Ok(body)
}

fn run_explain(dir: &std::path::Path, input: explain::Input) -> anyhow::Result<ExitCode> {
    let Some((rules, engine)) = load_rules(dir) else {
        return Ok(ExitCode::FAILURE);
    };
    let report = explain::explain(&rules, &engine, input)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// The rules and their engine, or `None` after printing every load error.
fn load_rules(dir: &std::path::Path) -> Option<(rules::RuleSet, script::ScriptEngine)> {
    let engine = script::ScriptEngine::new(dir, &script::Limits::default());
    match rules::load(dir, &engine) {
        Ok(rules) => Some((rules, engine)),
        Err(errors) => {
            for e in &errors.0 {
                println!("{e}");
            }
            None
        }
    }
}
