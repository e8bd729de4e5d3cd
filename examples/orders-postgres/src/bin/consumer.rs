//! Service B, billing: applies `OrderPlaced` from NATS JetStream to its
//! ledger. The ledger row and the inbox row commit in one transaction and
//! the broker is acked only after the commit, so a redelivered message is
//! recognised and skipped. Run it as one process or several (a rolling
//! deploy, standbys): one instance is active, the others stand by.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use clap::Parser;
use custody::nats::{ensure_stream, NatsSubscriber};
use custody::postgres::PgInbox;
use custody::{ConsumerConfig, Handler, HandlerError, LeaseConfig, LeasedConsumer, Message};
use example_orders_postgres::{open_database, start, NatsArgs, OrderPlaced};

/// The billing service: a consumer of the `orders` topic.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// The billing service's own database (it must exist; custody's tables are created in it).
    #[arg(long, env = "BILLING_DATABASE_URL")]
    database_url: String,
    #[command(flatten)]
    nats: NatsArgs,
    /// The consumer's name: its inbox, dead letters, lease and JetStream durable.
    #[arg(long, env = "BILLING_CONSUMER", default_value = "billing")]
    name: String,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9465.
    #[arg(long, env = "BILLING_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

/// The service's own table, written only by the handler.
const CREATE_LEDGER: &str = "CREATE TABLE IF NOT EXISTS ledger (
    order_id BIGINT NOT NULL,
    customer TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    message_id UUID NOT NULL
)";

struct Billing;

impl Handler<sqlx::Transaction<'static, sqlx::Postgres>> for Billing {
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        msg: &Message,
    ) -> Result<(), HandlerError> {
        match msg.message_type.as_str() {
            "OrderPlaced" => {
                let o: OrderPlaced = msg.decode_json()?; // bad payload → dead letter
                sqlx::query("INSERT INTO ledger (order_id, customer, amount_cents, message_id) VALUES ($1, $2, $3, $4)")
                    .bind(o.order_id)
                    .bind(&o.customer)
                    .bind(o.amount_cents)
                    .bind(msg.id)
                    .execute(&mut **tx)
                    .await
                    .map_err(HandlerError::transient)?; // retried with backoff
                Ok(())
            }
            other => Err(HandlerError::UnknownType(other.into())), // dead letter
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    start(args.metrics_addr)?;
    let pool = open_database(&args.database_url).await?; // with custody's tables (inbox, lease)
    sqlx::query(CREATE_LEDGER).execute(&pool).await?;

    let spec = args.nats.spec(); // the relay's stream and subject prefix
    let client = custody::nats::connect(&args.nats.nats).await?; // one NATS client per process
    ensure_stream(&client, &spec).await?; // a consumer may start before the relay
    let topics = ["orders".to_owned()];
    let cancel = custody::shutdown_token(); // cancelled on SIGINT or SIGTERM
    let stats = LeasedConsumer::new(
        PgInbox::new(pool),
        ConsumerConfig::new(&args.name),
        LeaseConfig::default(),
    )
    .run(
        || NatsSubscriber::new(client.clone(), &spec, &args.name, &topics),
        || Billing,
        cancel,
    )
    .await?; // until SIGINT/SIGTERM, then drains and releases the lease
    println!(
        "consumer stopped: processed {}, duplicates {}, dead-lettered {}",
        stats.processed, stats.duplicates, stats.dead_lettered
    );
    Ok(())
}
