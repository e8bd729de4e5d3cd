//! Operational commands: migrate, relay (dead letters: `dlq.rs`).

use std::process::ExitCode;

use anyhow::Context;

use clap::Args;
use custody::{CancellationToken, Relay};

use crate::config::Config;

/// A database given by URL, connected and with custody's tables migrated.
pub enum Db {
    /// `sqlite://…` or a file path.
    Sqlite(sqlx::SqlitePool),
    /// `postgres://…` / `postgresql://…`.
    Postgres(sqlx::PgPool),
}

impl Db {
    /// Connect and migrate; anything that is not a PostgreSQL URL is a SQLite path.
    pub async fn open(url: &str) -> anyhow::Result<Db> {
        Ok(
            if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                let pool = custody::postgres::connect(url).await?;
                custody::postgres::migrate(&pool).await?;
                Db::Postgres(pool)
            } else {
                let pool = custody::sqlite::connect(url).await?;
                custody::sqlite::migrate(&pool).await?;
                Db::Sqlite(pool)
            },
        )
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
