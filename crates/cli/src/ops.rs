//! Operational commands: migrate, relay (dead letters: `dlq.rs`).

use std::process::ExitCode;

use anyhow::Context;

use clap::Args;
use custody::{CancellationToken, Relay};

use crate::config::Config;

/// A database given by URL: connected and migrated ([`Db::open`], for the
/// commands that run the pipeline) or connected and checked ([`Db::open_existing`],
/// for the commands that inspect it).
pub enum Db {
    /// `sqlite://…` or a file path.
    Sqlite(sqlx::SqlitePool),
    /// `postgres://…` / `postgresql://…`.
    Postgres(sqlx::PgPool),
}

impl Db {
    /// Connect and migrate; anything that is not a PostgreSQL URL is a SQLite path.
    pub async fn open(url: &str) -> anyhow::Result<Db> {
        Ok(if is_postgres(url) {
            let pool = custody::postgres::connect(url).await?;
            custody::postgres::migrate(&pool).await?;
            Db::Postgres(pool)
        } else {
            let pool = custody::sqlite::connect(url).await?;
            custody::sqlite::migrate(&pool).await?;
            Db::Sqlite(pool)
        })
    }

    /// Connect to an existing custody database and check its schema, never
    /// creating or migrating anything (`reconcile`, `trace`, `dlq`): a
    /// mistyped path or database name, or a database without custody's
    /// tables, is an error naming it, and nothing is written to it.
    /// `role` names the database in the error ("consumer database").
    pub async fn open_existing(role: &str, url: &str) -> anyhow::Result<Db> {
        let opened = if is_postgres(url) {
            custody::postgres::open_existing(url)
                .await
                .map(Db::Postgres)
        } else {
            custody::sqlite::open_existing(url).await.map(Db::Sqlite)
        };
        opened.map_err(|e| anyhow::anyhow!("{role} {}: {}", redact(url), config_text(&e)))
    }

    /// Whether `topic` appears anywhere in this database.
    pub async fn topic_seen(&self, topic: &str) -> anyhow::Result<bool> {
        Ok(match self {
            Db::Sqlite(pool) => custody::sqlite::topic_seen(pool, topic).await?,
            Db::Postgres(pool) => custody::postgres::topic_seen(pool, topic).await?,
        })
    }

    /// Whether consumer `name` has recorded anything in this database.
    pub async fn consumer_seen(&self, name: &str) -> anyhow::Result<bool> {
        Ok(match self {
            Db::Sqlite(pool) => custody::sqlite::consumer_seen(pool, name).await?,
            Db::Postgres(pool) => custody::postgres::consumer_seen(pool, name).await?,
        })
    }

    /// ` (topics there: a, b)` for an error message, or what to say when
    /// there are none.
    pub async fn topics_hint(&self) -> String {
        let found = match self {
            Db::Sqlite(pool) => custody::sqlite::topics(pool, NAMES_SHOWN).await,
            Db::Postgres(pool) => custody::postgres::topics(pool, NAMES_SHOWN).await,
        };
        hint(found, "topics", "no message of any topic")
    }

    /// ` (consumers there: a, b)` for an error message, or what to say when
    /// there are none.
    pub async fn consumers_hint(&self) -> String {
        let found = match self {
            Db::Sqlite(pool) => custody::sqlite::consumers(pool, NAMES_SHOWN).await,
            Db::Postgres(pool) => custody::postgres::consumers(pool, NAMES_SHOWN).await,
        };
        hint(found, "consumers", "no consumer has recorded anything")
    }
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

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
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
    #[arg(long, env = "CUSTODY_DB")]
    pub db: String,
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    Db::open(&args.db).await?;
    println!("custody tables are up to date in {}", redact(&args.db));
    Ok(ExitCode::SUCCESS)
}

/// `custody relay`.
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// The producer's database holding the outbox.
    #[arg(long, env = "CUSTODY_DB")]
    pub db: String,
    /// NATS server URL.
    #[arg(long, env = "CUSTODY_NATS", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// JetStream stream name (created if missing).
    #[arg(long, default_value = "CUSTODY")]
    pub stream: String,
    /// Subject prefix: a message of topic `orders` goes to `<prefix>.orders`.
    #[arg(long, default_value = "custody")]
    pub subject_prefix: String,
    /// Relay id in the lease table (default: random). Unique per live relay.
    #[arg(long)]
    pub id: Option<String>,
    /// Serve Prometheus metrics (`custody_relay_*`) on this address, at any path
    /// (e.g. `127.0.0.1:9464`, then `curl 127.0.0.1:9464/metrics`).
    #[arg(long, env = "CUSTODY_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
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
    let client = custody::nats::connect(&args.nats).await?;
    let spec = custody::nats::StreamSpec::new(&args.stream, &args.subject_prefix);
    custody::nats::ensure_stream(&client, &spec).await?;
    let publisher = custody::nats::NatsPublisher::new(client, &spec);
    let cancel = shutdown_token();
    let stats = match Db::open(&args.db).await? {
        Db::Sqlite(pool) => {
            let mut r = Relay::new(
                custody::sqlite::SqliteOutbox::new(pool),
                publisher,
                cfg.relay,
            );
            if let Some(id) = args.id {
                r = r.with_id(id);
            }
            r.run(cancel).await?
        }
        Db::Postgres(pool) => {
            let mut r = Relay::new(custody::postgres::PgOutbox::new(pool), publisher, cfg.relay);
            if let Some(id) = args.id {
                r = r.with_id(id);
            }
            r.run(cancel).await?
        }
    };
    println!(
        "relay stopped: published {}, dead-lettered {}, failed attempts {}",
        stats.published, stats.dead_lettered, stats.failures
    );
    Ok(ExitCode::SUCCESS)
}

/// A token cancelled on SIGINT or SIGTERM.
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        t.cancel();
    });
    token
}

/// A URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
