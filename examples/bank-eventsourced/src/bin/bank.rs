//! `bank`: run one command on an event-sourced account and print the
//! outcome as one JSON line. Exit status 0 when applied (or already
//! applied), 3 when the account refused the command, 4 when conflicts
//! exhausted the retries, 1 on an error.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use custody::repository::Outcome;
use example_bank_eventsourced::{accounts, Account, AccountCommand};
use uuid::Uuid;

/// An event-sourced bank account on SQLite.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// The bank's database (created if missing).
    #[arg(long, env = "BANK_DB", default_value = "bank.db")]
    db: String,
    /// Save a snapshot of an account every this many events (0: never).
    #[arg(long, env = "BANK_SNAPSHOT_EVERY", default_value_t = 10)]
    snapshot_every: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Open account ID for OWNER.
    Open {
        id: String,
        owner: String,
        #[command(flatten)]
        command_id: CommandId,
    },
    /// Deposit CENTS into account ID.
    Deposit {
        id: String,
        cents: i64,
        #[command(flatten)]
        command_id: CommandId,
    },
    /// Withdraw CENTS from account ID.
    Withdraw {
        id: String,
        cents: i64,
        #[command(flatten)]
        command_id: CommandId,
    },
    /// Print account ID's state and version.
    Show { id: String },
}

#[derive(clap::Args, Debug)]
struct CommandId {
    /// The command's id (a UUIDv7). Run a command again with the same id
    /// after a lost answer: it is applied once. Default: a new id.
    #[arg(long)]
    command_id: Option<Uuid>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bank: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let accounts = accounts(&args.db, args.snapshot_every).await?;
    let (id, command, command_id) = match args.command {
        Command::Show { id } => {
            let loaded = accounts.load(&id).await?;
            println!(
                "{}",
                serde_json::json!({
                    "account": id,
                    "state": loaded.state,
                    "version": loaded.version,
                    "snapshot_version": loaded.snapshot_version,
                    "events_read": loaded.events_read,
                })
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Open {
            id,
            owner,
            command_id,
        } => (id, AccountCommand::Open { owner }, command_id),
        Command::Deposit {
            id,
            cents,
            command_id,
        } => (id, AccountCommand::Deposit { cents }, command_id),
        Command::Withdraw {
            id,
            cents,
            command_id,
        } => (id, AccountCommand::Withdraw { cents }, command_id),
    };
    let command_id = command_id.command_id.unwrap_or_else(Uuid::now_v7);
    let outcome: Outcome<Account> = accounts.execute(&id, command_id, &command).await?;
    let (line, code) = match outcome {
        Outcome::Applied {
            events,
            version,
            idempotent,
            conflicts,
            ..
        } => (
            serde_json::json!({
                "outcome": "applied",
                "events": events,
                "version": version,
                "idempotent": idempotent,
                "conflicts": conflicts,
            }),
            ExitCode::SUCCESS,
        ),
        Outcome::Rejected(rejection) => (
            serde_json::json!({
                "outcome": "rejected",
                "rejection": rejection,
                "reason": rejection.to_string(),
            }),
            ExitCode::from(3),
        ),
        Outcome::GaveUp { attempts, .. } => (
            serde_json::json!({ "outcome": "gave_up", "attempts": attempts }),
            ExitCode::from(4),
        ),
        other => anyhow::bail!("account {id}: {other:?}"),
    };
    println!(
        "{}",
        serde_json::json!({ "command_id": command_id, "result": line })
    );
    Ok(code)
}
