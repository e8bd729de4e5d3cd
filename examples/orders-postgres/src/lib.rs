//! What the PostgreSQL + NATS example's programs share: the message they
//! exchange, the stream they agree on, logging and the Prometheus endpoint.
//! See README.md beside this crate.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use anyhow::Context;
use custody::nats::StreamSpec;
use custody::postgres::{connect, migrate};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// The event the producer commits with each order and the consumer applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPlaced {
    /// The order's id in the orders service's database.
    pub order_id: i64,
    /// Who ordered; also the message's ordering key.
    pub customer: String,
    /// The order's amount in cents.
    pub amount_cents: i64,
}

/// Where the messages travel: the relay and the consumer must agree on the
/// stream and the subject prefix. The defaults are those of `custody relay`.
#[derive(clap::Args, Debug, Clone)]
pub struct NatsArgs {
    /// NATS server with JetStream (`nats-server -js`).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// JetStream stream that carries the messages (created if missing).
    #[arg(long, env = "CUSTODY_STREAM", default_value = "CUSTODY")]
    pub stream: String,
    /// Subject prefix: topic `orders` travels on `<prefix>.orders`.
    #[arg(long, env = "CUSTODY_SUBJECT_PREFIX", default_value = "custody")]
    pub subject_prefix: String,
}

impl NatsArgs {
    /// The stream these arguments name.
    pub fn spec(&self) -> StreamSpec {
        StreamSpec::new(&self.stream, &self.subject_prefix)
    }
}

/// Log to stderr, filtered by `RUST_LOG` (default `info`, e.g.
/// `RUST_LOG=custody=debug,info`); no colour codes unless stderr is a terminal.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Serve this process's metrics (custody's and the service's own) in
/// Prometheus text format on `addr`, path `/metrics`.
pub fn serve_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .with_context(|| format!("cannot serve metrics on {addr}; is the port in use?"))?;
    tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    Ok(())
}

/// How each program here starts, after parsing its arguments: logging to
/// stderr ([`init_logging`]) and, if `metrics_addr` is given, the Prometheus
/// endpoint ([`serve_metrics`]).
pub fn start(metrics_addr: Option<SocketAddr>) -> anyhow::Result<()> {
    init_logging();
    if let Some(addr) = metrics_addr {
        serve_metrics(addr)?;
    }
    Ok(())
}

/// Connect to the service's own database and create or upgrade custody's
/// tables in it; the service's own tables are its to create.
pub async fn open_database(url: &str) -> anyhow::Result<PgPool> {
    let pool = connect(url).await?;
    migrate(&pool).await?; // custody's tables (outbox, inbox, dead letters, lease); safe at every start
    Ok(pool)
}
