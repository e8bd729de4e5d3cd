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
    #[arg(long, env = "CUSTODY_DB", hide_env_values = true)]
    pub db: String,
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    custody::open_admin(&args.db, Access::Migrate)
        .await
        .map_err(|e| anyhow::anyhow!("database {}: {}", redact(&args.db), config_text(&e)))?;
    println!("custody tables are up to date in {}", redact(&args.db));
    Ok(ExitCode::SUCCESS)
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
    let stats = custody::run_relay(&args.db, publisher, cfg.relay, args.id, cancel).await?;
    println!(
        "relay stopped: published {}, dead-lettered {}, failed attempts {}",
        stats.published, stats.dead_lettered, stats.failures
    );
    Ok(ExitCode::SUCCESS)
}

pub use custody::shutdown_token;
