//! `custody-demo` (also reachable as `custody demo` when installed beside
//! `custody`): an order service A and a billing service B with separate
//! databases, real faults injected while messages flow, and a report computed
//! by comparing A's and B's databases. A development tool, not part of the
//! `custody` operations binary; the services live in `custody-scenario`.
#![forbid(unsafe_code)]

mod embedded;
mod pg_nats;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser};
use custody_scenario::Internal;

// the allocator the demo ran with inside the `custody` binary
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Run two services (orders → billing) with injected faults and prove nothing was lost.
#[derive(Debug, Parser)]
#[command(name = "custody-demo", version, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    args: DemoArgs,
    #[command(subcommand)]
    worker: Option<Internal>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    custody_scenario::tool_main(cli.worker, run(cli.args))
}

/// `custody-demo` options.
#[derive(Debug, Clone, Args)]
pub(crate) struct DemoArgs {
    /// Orders service A commits (each an order row + an OrderPlaced event).
    #[arg(long, default_value_t = 3000)]
    pub(crate) messages: u64,
    /// Customers (ordering keys) the orders are spread over.
    #[arg(long, default_value_t = 50)]
    pub(crate) customers: u64,
    /// Seed for the workload and fault schedule (printed, so a run can be replayed).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Keep the databases in this directory instead of a temporary one.
    #[arg(long)]
    pub(crate) dir: Option<std::path::PathBuf>,
    /// Run on PostgreSQL (A and B get their own fresh databases on this server) ...
    #[arg(long, requires = "nats")]
    pub(crate) postgres: Option<String>,
    /// ... with NATS JetStream as the transport.
    #[arg(long, requires = "postgres")]
    pub(crate) nats: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Give up waiting for the pipeline to drain after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
    pub(crate) timeout: Duration,
}

/// Run the demo.
pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let seed = custody_scenario::services::seed_or_now(args.seed);
    if args.messages < 10 {
        anyhow::bail!(
            "--messages must be at least 10 (got {}) so every fault has messages to hit",
            args.messages
        );
    }
    if args.customers == 0 {
        anyhow::bail!("--customers must be at least 1");
    }
    let report = match (&args.postgres, &args.nats) {
        (Some(pg), Some(nats)) => pg_nats::run(&args, seed, pg, nats).await?,
        _ => embedded::run(&args, seed).await?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print();
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
