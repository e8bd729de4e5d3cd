//! The `custody` command line, the operations tool: `migrate`, `relay`, `consume`, `produce`,
//! `events`, `dlq`, `projection`, `reconcile`, `trace`. The development tools (`demo`, `chaos`,
//! `bench`) are separate binaries under tools/ that `custody` forwards to.
#![forbid(unsafe_code)]

mod config;
mod consume;
mod dlq;
mod events;
mod ops;
mod produce;
mod projection;
mod reconcile;
mod tools;
mod trace;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

// The relay and the consumer allocate and free many small buffers per message
// (rows, headers, envelopes); glibc's malloc took 30 % of the relay's CPU in a
// profile of `bench relay-drain` (malloc_consolidate, _int_free, …).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// custody: transactional outbox, relay and idempotent inbox. Every command is listed below;
/// `custody <command> --help` explains one.
#[derive(Debug, Parser)]
#[command(name = "custody", version, long_about = None, after_help = LOG_HELP)]
struct Cli {
    /// TOML config file; every key can be overridden by `CUSTODY_<SECTION>__<KEY>`
    /// environment variables (e.g. `CUSTODY_RELAY__BATCH_SIZE=200`).
    #[arg(long, global = true, env = "CUSTODY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run two services (orders → billing) with injected faults and prove nothing was lost (separate tool: custody-demo).
    #[command(disable_help_flag = true)]
    Demo(tools::ToolArgs),
    /// Create or upgrade custody's tables in a database.
    Migrate(ops::MigrateArgs),
    /// Move committed outbox messages to NATS JetStream until stopped (SIGINT/SIGTERM).
    Relay(ops::RelayArgs),
    /// Consume messages (NATS or a producer's outbox) with a handler given here: print, record:<table>, http:<url>.
    Consume(consume::ConsumeArgs),
    /// Enqueue test messages through a database's outbox.
    Produce(produce::ProduceArgs),
    /// The event store: append to a stream, read a stream, tail the global log, list streams.
    Events(events::EventsArgs),
    /// Dead letters: list, show, redrive (back to the consumer or the relay), purge.
    Dlq(dlq::DlqArgs),
    /// CQRS projections: status, rebuild without downtime, reset, dead letters, retry.
    Projection(projection::ProjectionArgs),
    /// Compare what a producer sent with what a consumer processed, per time window.
    Reconcile(reconcile::ReconcileArgs),
    /// One message's timeline across the databases given: enqueued, published, processed, dead.
    Trace(trace::TraceArgs),
    /// Measure a pipeline against its ceilings on this machine (separate tool: custody-bench).
    #[command(disable_help_flag = true)]
    Bench(tools::ToolArgs),
    /// Run producer, relays and consumer as processes under load, inject faults from a seed, and check nothing broke (separate tool: custody-chaos).
    #[command(disable_help_flag = true)]
    Chaos(tools::ToolArgs),
}

/// The end of `custody --help`: how to set what is logged.
const LOG_HELP: &str = "Logs go to stderr, without colour codes unless stderr is a terminal. \
CUSTODY_LOG sets what is logged: an env-filter (tracing-subscriber's EnvFilter), e.g. \
`CUSTODY_LOG=debug`, `CUSTODY_LOG=warn,custody_engine=debug`; \
default `info` for migrate and relay, `warn` for dlq, reconcile and trace (docs/CONFIG.md).";

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CUSTODY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // colour codes only for a terminal: a log redirected to a file or
        // a pipe must read as plain text
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Migrate(args) => {
                // PostgreSQL's notices (`… already exists, skipping`) are not
                // the user's business here: warnings and errors still show
                init_tracing("info,sqlx::postgres::notice=warn");
                let cfg = config::load(cli.config.as_deref())?;
                ops::migrate(args, cfg).await
            }
            Command::Relay(args) => {
                init_tracing("info");
                let cfg = config::load(cli.config.as_deref())?;
                ops::relay(args, cfg).await
            }
            Command::Consume(args) => {
                init_tracing("info");
                let cfg = config::load(cli.config.as_deref())?;
                consume::run(args, cfg).await
            }
            Command::Produce(args) => {
                init_tracing("warn");
                produce::run(args).await
            }
            Command::Events(args) => {
                init_tracing("warn");
                events::run(args).await
            }
            Command::Dlq(args) => {
                init_tracing("warn");
                dlq::run(args).await
            }
            Command::Projection(args) => {
                init_tracing("warn");
                projection::run(args).await
            }
            Command::Reconcile(args) => {
                init_tracing("warn");
                reconcile::run(args).await
            }
            Command::Trace(args) => {
                init_tracing("warn");
                trace::run(args).await
            }
            // the development tools are their own binaries (tools/)
            Command::Demo(args) => Ok(tools::forward("demo", args)),
            Command::Chaos(args) => Ok(tools::forward("chaos", args)),
            Command::Bench(args) => Ok(tools::forward("bench", args)),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, leaving out a cause whose text the message
/// already contains (libraries often repeat their source in their message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}
