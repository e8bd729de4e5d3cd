//! What the SQLite example's programs share: the message they exchange,
//! logging and the Prometheus endpoint. See README.md beside this crate.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use anyhow::Context;
use custody::sqlite::{connect, migrate};
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;

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
pub async fn open_database(url: &str) -> anyhow::Result<SqlitePool> {
    let pool = connect(url).await?;
    migrate(&pool).await?; // custody's tables (outbox, inbox, dead letters); safe at every start
    Ok(pool)
}
