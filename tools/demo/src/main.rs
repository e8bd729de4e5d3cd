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
    #[arg(long, default_value_t = 3000, value_name = "N")]
    pub(crate) messages: u64,
    /// Customers (ordering keys) the orders are spread over.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub(crate) customers: u64,
    /// Seed for the workload and fault schedule (printed, so a run can be replayed).
    #[arg(long, value_name = "SEED")]
    pub(crate) seed: Option<u64>,
    /// Put the SQLite databases in this directory instead of a temporary one (they stay there).
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: Option<std::path::PathBuf>,
    /// Run on PostgreSQL: the demo creates two fresh databases of its own (A's and B's) on the
    /// server this URL points to; the database named in the URL must exist and is only used to
    /// connect (e.g. `postgres://postgres@127.0.0.1:5432/postgres`). Needs `--nats`.
    #[arg(long, requires = "nats", value_name = "URL")]
    pub(crate) postgres: Option<String>,
    /// NATS JetStream server (started with `-js`) as the transport, with `--postgres`; the demo
    /// creates a stream of its own there.
    #[arg(long, requires = "postgres", value_name = "URL")]
    pub(crate) nats: Option<String>,
    /// Keep what the run created (the SQLite directory, or the PostgreSQL databases and the
    /// NATS stream) and print where it is and the `custody trace/reconcile/dlq` commands to
    /// inspect it. Without it, they are removed at the end.
    #[arg(long)]
    pub(crate) keep: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Give up waiting for the pipeline to drain after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "120s", value_name = "DURATION")]
    pub(crate) timeout: Duration,
}

/// What to print after the report: where the kept databases (and stream)
/// are and the commands that inspect them, or that they were removed.
pub(crate) fn epilogue(kept: Option<Kept<'_>>, removed: &str) -> String {
    let Some(k) = kept else {
        return format!(
            "\nremoved {removed} (pass --keep to keep what the run created, for inspection)\n"
        );
    };
    let mut out = String::from("\nkept for inspection:\n");
    for (what, where_) in &k.places {
        out.push_str(&format!("  {what:<22} {where_}\n"));
    }
    let id = k.example_id.map_or("<ID>".to_owned(), |i| i.to_string());
    let (a, b) = (&k.a, &k.b);
    out.push_str("inspect them with:\n");
    out.push_str(&format!("  custody trace {id} --db {a} --db {b}\n"));
    out.push_str(&format!(
        "  custody reconcile --producer {a} --consumer {b} --consumer-name billing --topic orders --settle 0s\n"
    ));
    out.push_str(&format!("  custody dlq list --db {b}\n"));
    out.push_str(&format!("  custody dlq show {id} --db {b}\n"));
    if k.password_left_out {
        out.push_str("  (the password is shown as ***: put yours back in the URLs)\n");
    }
    for line in &k.cleanup {
        out.push_str(&format!("remove them later with: {line}\n"));
    }
    out
}

/// What a `--keep` run leaves behind.
pub(crate) struct Kept<'a> {
    /// (what, where) for each thing kept.
    pub(crate) places: Vec<(&'a str, String)>,
    /// A's and B's database, as `custody --db` takes them.
    pub(crate) a: String,
    /// B's database.
    pub(crate) b: String,
    /// A message id worth tracing (a dead-lettered one), if any.
    pub(crate) example_id: Option<uuid::Uuid>,
    /// The URLs shown had a password, replaced by `***`.
    pub(crate) password_left_out: bool,
    /// Commands that remove what was kept.
    pub(crate) cleanup: Vec<String>,
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
    let (report, epilogue) = match (&args.postgres, &args.nats) {
        (Some(pg), Some(nats)) => pg_nats::run(&args, seed, pg, nats).await?,
        _ => embedded::run(&args, seed).await?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print("custody demo");
    }
    // on stderr, so that `--json` output stays JSON
    eprint!("{epilogue}");
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
