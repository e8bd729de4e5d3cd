//! The relay: moves the orders service's committed outbox messages to NATS
//! JetStream, in order per key, marking each published only after the
//! broker's ack. Equivalent to `custody relay --db … --nats … --stream …
//! --subject-prefix …`; it can also run as a task inside the producer.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use clap::Parser;
use custody::nats::{ensure_stream, NatsPublisher};
use custody::postgres::PgOutbox;
use custody::{Relay, RelayConfig};
use example_orders_postgres::{open_database, start, NatsArgs};

/// The relay from the orders service's outbox to NATS JetStream.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// The orders service's database (the producer's), whose outbox is relayed.
    #[arg(long, env = "ORDERS_DATABASE_URL")]
    database_url: String,
    #[command(flatten)]
    nats: NatsArgs,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9466.
    #[arg(long, env = "RELAY_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    start(args.metrics_addr)?;
    let pool = open_database(&args.database_url).await?;

    let spec = args.nats.spec(); // subjects <prefix>.<topic>
    let client = custody::nats::connect(&args.nats.nats).await?; // one NATS client per process
    ensure_stream(&client, &spec).await?;
    let publisher = NatsPublisher::new(client, &spec);
    let relay = Relay::new(PgOutbox::new(pool), publisher, RelayConfig::default());
    let cancel = custody::shutdown_token(); // cancelled on SIGINT or SIGTERM
    let stats = relay.run(cancel).await?; // until SIGINT/SIGTERM, then gives back its leases
    println!(
        "relay stopped: published {}, dead-lettered {}, failed attempts {}",
        stats.published, stats.dead_lettered, stats.failures
    );
    Ok(())
}
