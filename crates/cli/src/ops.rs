//! Operational commands: migrate, relay (dead letters: `dlq.rs`).

use std::process::ExitCode;

use anyhow::Context;

use clap::Args;
use custody::{Access, Admin};

/// A URL without its password, for messages (one behaviour everywhere).
pub use custody::redact_url as redact;

use crate::config::Config;

/// Open the custody database at `url` as it is, for the commands that
/// inspect it (`reconcile`, `trace`, `dlq`): never created, migrated or
/// written to by the opening, whichever backend the URL names (the registry
/// in `custody::drivers`). A mistyped path or database name, a database
/// without custody's tables or a URL no backend accepts is an error naming
/// it; `role` names the database in the error ("consumer database").
pub async fn open_existing(role: &str, url: &str) -> anyhow::Result<Box<dyn Admin>> {
    custody::open_admin(url, Access::Existing)
        .await
        .map_err(|e| anyhow::anyhow!("{role} {}: {}", redact(url), config_text(&e)))
}

/// ` (topics there: a, b)` for an error message, or what to say when
/// there are none.
pub async fn topics_hint(db: &dyn Admin) -> String {
    hint(
        db.topics(NAMES_SHOWN).await,
        "topics",
        "no message of any topic",
    )
}

/// ` (consumers there: a, b)` for an error message, or what to say when
/// there are none.
pub async fn consumers_hint(db: &dyn Admin) -> String {
    hint(
        db.consumers(NAMES_SHOWN).await,
        "consumers",
        "no consumer has recorded anything",
    )
}

/// Names listed in an error about a name never seen.
const NAMES_SHOWN: u32 = 20;

fn hint(found: custody::Result<Vec<String>>, what: &str, none: &str) -> String {
    match found {
        Ok(names) if names.is_empty() => format!(" ({none} there yet)"),
        Ok(names) => {
            let shown: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
            let more = if names.len() as u32 >= NAMES_SHOWN {
                ", …"
            } else {
                ""
            };
            format!(" ({what} there: {}{more})", shown.join(", "))
        }
        Err(_) => String::new(),
    }
}

/// An error's text without the "configuration: " its display adds when
/// the problem is what the user pointed at.
pub fn config_text(e: &custody::Error) -> String {
    match e {
        custody::Error::Config(text) => text.clone(),
        other => other.to_string(),
    }
}

/// `custody migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Database URL: `postgres://…` or a SQLite file (`sqlite://path` or a path).
    #[arg(long, env = "CUSTODY_DB", hide_env_values = true, value_name = "URL")]
    pub db: String,
}

/// `custody migrate`: apply custody's migrations (recorded in its own
/// `custody_migrations` table) and say what was done. The configuration
/// (`--config`, `CUSTODY_*`) is loaded and validated first, as every
/// command that runs a service does, so a broken one fails here and not at
/// the relay's start.
pub async fn migrate(args: MigrateArgs, _cfg: Config) -> anyhow::Result<ExitCode> {
    let shown = redact(&args.db);
    let report = custody::admin::migrate(&custody::drivers(), &args.db)
        .await
        .map_err(|e| {
            let text = config_text(&e);
            // most errors name the database already
            if text.contains(&shown) {
                anyhow::anyhow!("{text}")
            } else {
                anyhow::anyhow!("database {shown}: {text}")
            }
        })?;
    for line in migrate_lines(&report, &shown) {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// What `custody migrate` prints for `report` on database `shown`.
fn migrate_lines(report: &custody::admin::MigrationReport, shown: &str) -> Vec<String> {
    let mut lines = Vec::new();
    if report.adopted > 0 {
        lines.push(format!(
            "adopted {} an earlier custody recorded in _sqlx_migrations: they are in \
             custody_migrations now, and custody's rows are gone from _sqlx_migrations \
             (docs/SCHEMA.md)",
            migrations(report.adopted)
        ));
    }
    if report.up_to_date() {
        lines.push(format!(
            "custody's tables are up to date ({}) in {shown}",
            migrations(report.total())
        ));
        return lines;
    }
    let names: Vec<String> = report
        .applied
        .iter()
        .map(|m| format!("{:04} {}", m.version, m.description))
        .collect();
    let already = if report.already > 0 {
        format!(" ({} already there)", report.already)
    } else {
        String::new()
    };
    lines.push(format!(
        "applied {} to {shown}{already}: {}",
        migrations(report.applied.len()),
        names.join(", ")
    ));
    lines
}

fn migrations(n: usize) -> String {
    if n == 1 {
        "1 migration".to_owned()
    } else {
        format!("{n} migrations")
    }
}

#[cfg(test)]
mod tests {
    use custody::admin::{AppliedMigration, MigrationReport};

    use super::migrate_lines;

    #[test]
    fn migrate_says_what_it_did() {
        let applied = |version: i64, d: &str| AppliedMigration {
            version,
            description: d.to_owned(),
        };
        let fresh = MigrationReport {
            applied: vec![applied(1, "custody"), applied(2, "outbox retention")],
            ..MigrationReport::default()
        };
        assert_eq!(
            migrate_lines(&fresh, "a.db"),
            ["applied 2 migrations to a.db: 0001 custody, 0002 outbox retention"]
        );
        let partly = MigrationReport {
            applied: vec![applied(2, "outbox retention")],
            already: 1,
            adopted: 0,
        };
        assert_eq!(
            migrate_lines(&partly, "a.db"),
            ["applied 1 migration to a.db (1 already there): 0002 outbox retention"]
        );
        let done = MigrationReport {
            applied: vec![],
            already: 2,
            adopted: 2,
        };
        let lines = migrate_lines(&done, "a.db");
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("adopted 2 migrations"), "{lines:?}");
        assert_eq!(
            lines[1],
            "custody's tables are up to date (2 migrations) in a.db"
        );
    }
}

/// `custody relay`.
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// The producer's database holding the outbox.
    #[arg(long, env = "CUSTODY_DB", hide_env_values = true, value_name = "URL")]
    pub db: String,
    /// NATS server URL.
    #[arg(
        long,
        env = "CUSTODY_NATS",
        hide_env_values = true,
        default_value = "nats://127.0.0.1:4222",
        value_name = "URL"
    )]
    pub nats: String,
    /// JetStream stream name (created if missing).
    #[arg(long, default_value = DEFAULT_STREAM, value_name = "NAME")]
    pub stream: String,
    /// Subject prefix: a message of topic `orders` goes to `<prefix>.orders`.
    #[arg(long, default_value = DEFAULT_SUBJECT_PREFIX, value_name = "PREFIX")]
    pub subject_prefix: String,
    /// Relay id in the lease table (default: random). Unique per live relay.
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Serve Prometheus metrics (`custody_relay_*`) on this address, at any path
    /// (e.g. `127.0.0.1:9464`, then `curl 127.0.0.1:9464/metrics`).
    #[arg(long, env = "CUSTODY_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Publish the event store's log instead of the outbox (docs/EVENTSTORE.md, "Publishing the event log"):
    /// each event as a message with the event's id, keyed by its stream.
    #[arg(long)]
    pub from_events: bool,
    /// With `--from-events`: publish only this stream category (`order` for `order-*`).
    /// Repeat for several; none: the whole log.
    #[arg(long = "category", requires = "from_events", value_name = "CATEGORY")]
    pub categories: Vec<String>,
    /// With `--from-events`: publish every event on this topic (default: the topic of an
    /// event is its stream's category).
    #[arg(long, requires = "from_events", value_name = "TOPIC")]
    pub topic: Option<String>,
    /// With `--from-events`: the log relay's name, under which its checkpoint, journal
    /// and lease are kept. Processes with one name never publish at the same time.
    #[arg(
        long,
        requires = "from_events",
        default_value = "events",
        value_name = "NAME"
    )]
    pub name: String,
}

/// The log relay the flags `--category`, `--topic` and `--name` describe
/// (`custody relay --from-events`, `custody reconcile --from-events`).
pub fn log_relay_config(
    name: &str,
    categories: &[String],
    topic: Option<&str>,
) -> custody::log_relay::LogRelayConfig {
    let mut log = custody::log_relay::LogRelayConfig::new(name);
    for c in categories {
        log = log.category(c.clone());
    }
    if let Some(t) = topic {
        log = log.default_topic(t);
    }
    log
}

/// `custody relay`'s stream, also `custody consume`'s default, so the two
/// meet without flags.
pub const DEFAULT_STREAM: &str = "CUSTODY";
/// `custody relay`'s subject prefix, also `custody consume`'s default.
pub const DEFAULT_SUBJECT_PREFIX: &str = "custody";

/// Connect to NATS at `url` with the `[nats]` section of the config
/// (credentials, TLS): the one way every command reaches NATS. A refused
/// connection is terminal and names the link and what to fix.
pub async fn connect_nats(url: &str, cfg: &Config) -> anyhow::Result<custody::nats::Client> {
    Ok(custody::nats::connect_with(url, &cfg.nats).await?)
}

/// Serve the process's metrics in Prometheus text format on `addr`.
pub fn serve_metrics(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .with_context(|| format!("cannot serve metrics on {addr}; is the port in use?"))?;
    tracing::info!(%addr, "serving Prometheus metrics");
    Ok(())
}

pub async fn relay(args: RelayArgs, cfg: Config) -> anyhow::Result<ExitCode> {
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr)?;
    }
    let client = connect_nats(&args.nats, &cfg).await?;
    let spec = custody::nats::StreamSpec::new(&args.stream, &args.subject_prefix);
    custody::nats::ensure_stream(&client, &spec).await?;
    let publisher = custody::nats::NatsPublisher::new(client, &spec);
    let cancel = shutdown_token();
    let stats = if args.from_events {
        let log = log_relay_config(&args.name, &args.categories, args.topic.as_deref());
        custody::log_relay::run_log_relay(&args.db, publisher, log, cfg.relay, args.id, cancel)
            .await?
    } else {
        custody::run_relay(&args.db, publisher, cfg.relay, args.id, cancel).await?
    };
    println!(
        "relay stopped: published {}, dead-lettered {}, failed attempts {}",
        stats.published, stats.dead_lettered, stats.failures
    );
    Ok(ExitCode::SUCCESS)
}

pub use custody::shutdown_token;
