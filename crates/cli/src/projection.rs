//! `custody projection status|rebuild|reset|dead-letters|retry`: the
//! operator's side of CQRS projections (docs/PROJECTIONS.md).
//!
//! A projection's code is the application's Rust, which this binary cannot
//! run: these commands write a request into the read-model database and the
//! projection's active runner (the holder of its lease) carries it out;
//! `rebuild` and `reset` then watch its progress rows until it is done.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use clap::{Args, Subcommand};
use custody::projection::{open_projection_admin, ProjectionAdmin, ProjectionStatus, Request};
use indicatif::{ProgressBar, ProgressStyle};

use crate::ops::{config_text, redact};

/// `custody projection`.
#[derive(Debug, Args)]
pub struct ProjectionArgs {
    #[command(subcommand)]
    pub command: ProjectionCommand,
}

/// The read-model database.
#[derive(Debug, Args)]
pub struct Db {
    /// Read-model database URL (`postgres://…` or a SQLite file): where the projection's tables,
    /// checkpoint and lease are.
    #[arg(long, env = "CUSTODY_DB", hide_env_values = true, value_name = "URL")]
    pub db: String,
}

/// How `rebuild` and `reset` wait.
#[derive(Debug, Args)]
pub struct Wait {
    /// Return once the request is recorded, without watching the runner carry it out.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up watching after this long (e.g. `10m`); the request stays and the runner goes on.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

/// Projection subcommands.
#[derive(Debug, Subcommand)]
pub enum ProjectionCommand {
    /// Name, version, generation, checkpoint, head, lag (events and seconds), active runner,
    /// rebuild progress and dead letters of every projection (or one).
    Status {
        /// Only this projection.
        #[arg(value_name = "NAME")]
        name: Option<String>,
        #[command(flatten)]
        db: Db,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild from position 0 without downtime: the active runner builds the next generation
    /// beside the live one, then switches readers to it atomically. Shows progress, rate and ETA.
    Rebuild {
        /// The projection.
        #[arg(value_name = "NAME")]
        name: String,
        #[command(flatten)]
        db: Db,
        #[command(flatten)]
        wait: Wait,
    },
    /// Replace the read model at once by an empty one that starts after POSITION (0: replay
    /// everything). Readers see it empty until it catches up; use `rebuild` to avoid that.
    Reset {
        /// The projection.
        #[arg(value_name = "NAME")]
        name: String,
        /// Events up to this log position are not applied.
        #[arg(long, value_name = "POSITION", default_value_t = 0)]
        to: u64,
        #[command(flatten)]
        db: Db,
        #[command(flatten)]
        wait: Wait,
    },
    /// Events the projection failed on permanently (skipped), with their reasons.
    DeadLetters {
        /// The projection.
        #[arg(value_name = "NAME")]
        name: String,
        #[command(flatten)]
        db: Db,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ask the active runner to apply dead-lettered events again (after fixing the projection).
    Retry {
        /// The projection.
        #[arg(value_name = "NAME")]
        name: String,
        /// Only the dead letter at this log position.
        #[arg(
            long,
            value_name = "POSITION",
            conflicts_with = "all",
            required_unless_present = "all"
        )]
        position: Option<u64>,
        /// Every dead letter of the projection.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        db: Db,
    },
}

async fn open(url: &str) -> anyhow::Result<Box<dyn ProjectionAdmin>> {
    open_projection_admin(url)
        .await
        .map_err(|e| anyhow::anyhow!("read-model database {}: {}", redact(url), config_text(&e)))
}

/// Run `custody projection …`.
pub async fn run(args: ProjectionArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        ProjectionCommand::Status { name, db, json } => {
            let admin = open(&db.db).await?;
            let rows = admin
                .status(name.as_deref())
                .await
                .map_err(|e| anyhow::anyhow!(config_text(&e)))?;
            if json {
                for row in &rows {
                    println!("{}", serde_json::to_string(row)?);
                }
            } else {
                print_status(&rows);
            }
            Ok(ExitCode::SUCCESS)
        }
        ProjectionCommand::Rebuild { name, db, wait } => {
            let admin = open(&db.db).await?;
            request(admin.as_ref(), &name, Request::Rebuild, wait).await
        }
        ProjectionCommand::Reset { name, to, db, wait } => {
            let admin = open(&db.db).await?;
            request(admin.as_ref(), &name, Request::Reset { to }, wait).await
        }
        ProjectionCommand::DeadLetters { name, db, json } => {
            let admin = open(&db.db).await?;
            let rows = admin
                .dead_letters(&name)
                .await
                .map_err(|e| anyhow::anyhow!(config_text(&e)))?;
            if json {
                for row in &rows {
                    println!("{}", serde_json::to_string(row)?);
                }
            } else if rows.is_empty() {
                println!("no dead letters for projection {name}");
            } else {
                println!(
                    "{:>10}  {:<24}  {:>7}  {:<20}  {:<5}  REASON",
                    "POSITION", "STREAM", "VERSION", "TYPE", "RETRY"
                );
                for d in rows {
                    println!(
                        "{:>10}  {:<24}  {:>7}  {:<20}  {:<5}  {}",
                        d.position,
                        d.stream,
                        d.stream_version,
                        d.event_type,
                        if d.retry_requested { "yes" } else { "no" },
                        d.reason
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ProjectionCommand::Retry {
            name,
            position,
            all: _,
            db,
        } => {
            let admin = open(&db.db).await?;
            let n = admin
                .retry(&name, position)
                .await
                .map_err(|e| anyhow::anyhow!(config_text(&e)))?;
            if n == 0 {
                anyhow::bail!(
                    "projection {name} has no dead letter{}; `custody projection dead-letters {name}` lists them",
                    position.map_or(String::new(), |p| format!(" at position {p}"))
                );
            }
            println!("{n} dead letter(s) of {name} marked for retry; the active runner applies them next");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_status(rows: &[ProjectionStatus]) {
    if rows.is_empty() {
        println!("no projections in this database (one appears once its runner has started)");
        return;
    }
    println!(
        "{:<24} {:>7} {:>4} {:>10} {:>10} {:>10} {:>8}  {:<28} {:<22} {:>4}",
        "NAME", "VERSION", "GEN", "CHECKPOINT", "HEAD", "LAG", "LAG_S", "RUNNER", "REBUILD", "DEAD"
    );
    let now = Utc::now();
    for s in rows {
        let runner = match (&s.runner, s.runner_until) {
            (Some(h), Some(until)) if until > now => h.clone(),
            (Some(h), _) => format!("{h} (expired)"),
            _ => "none".to_owned(),
        };
        let rebuild = match (&s.rebuild, s.request) {
            (Some(b), _) => format!(
                "g{} v{} {}/{}",
                b.generation, b.version, b.checkpoint, s.head
            ),
            (None, Some(Request::Rebuild)) => "requested".to_owned(),
            (None, Some(Request::Reset { to })) => format!("reset to {to} requested"),
            (None, None) => "-".to_owned(),
        };
        println!(
            "{:<24} {:>7} {:>4} {:>10} {:>10} {:>10} {:>8.1}  {:<28} {:<22} {:>4}",
            s.name,
            s.active.version,
            s.active.generation,
            s.active.checkpoint,
            s.head,
            s.lag_events,
            s.lag_seconds,
            runner,
            rebuild,
            s.dead_letters
        );
    }
}

/// Record `req` for `name`, then (unless `--no-wait`) watch the runner
/// until a new generation is active and no request is pending.
async fn request(
    admin: &dyn ProjectionAdmin,
    name: &str,
    req: Request,
    wait: Wait,
) -> anyhow::Result<ExitCode> {
    let before = one(admin, name).await?;
    admin
        .request(name, req)
        .await
        .map_err(|e| anyhow::anyhow!(config_text(&e)))?;
    let what = match req {
        Request::Rebuild => "rebuild",
        Request::Reset { .. } => "reset",
    };
    let runner_live = before
        .runner_until
        .is_some_and(|until| before.runner.is_some() && until > Utc::now());
    if !runner_live {
        eprintln!(
            "warning: no runner of projection {name} holds its lease now; the {what} starts when one runs"
        );
    }
    if wait.no_wait {
        println!(
            "{what} of {name} requested; `custody projection status {name}` shows its progress"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let bar = ProgressBar::new(before.head.max(1));
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {pos}/{len} events, {per_sec}, ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(format!("{what} {name}: waiting for the runner"));
    let started = tokio::time::Instant::now();
    loop {
        let now = one(admin, name).await?;
        if now.request.is_none()
            && now.rebuild.is_none()
            && now.active.generation > before.active.generation
        {
            bar.finish_and_clear();
            println!(
                "{name}: generation {} (version {}) is active at checkpoint {} (head {}); {what} done in {:.1?}",
                now.active.generation,
                now.active.version,
                now.active.checkpoint,
                now.head,
                started.elapsed()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(b) = &now.rebuild {
            bar.set_length(now.head.max(b.checkpoint).max(1));
            bar.set_position(b.checkpoint);
            bar.set_message(format!("{what} {name} (generation {})", b.generation));
        }
        if let Some(limit) = wait.timeout {
            if started.elapsed() >= limit {
                bar.abandon();
                anyhow::bail!(
                    "the {what} of {name} is not finished after {limit:?}; the request stays and the runner goes on (`custody projection status {name}`)"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn one(admin: &dyn ProjectionAdmin, name: &str) -> anyhow::Result<ProjectionStatus> {
    admin
        .status(Some(name))
        .await
        .map_err(|e| anyhow::anyhow!(config_text(&e)))?
        .into_iter()
        .next()
        .with_context(|| format!("projection {name} is not in this database"))
}
