//! Service B, billing: applies `OrderPlaced` to its ledger, reading the
//! orders service's outbox directly (the embedded transport: no broker).
//! The ledger row and the inbox row commit in one transaction, so a
//! redelivered message is recognised and skipped.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use custody::sqlite::{open_existing, SqliteEmbeddedSubscriber, SqliteInbox};
use custody::{Consumer, ConsumerConfig, Handler, HandlerError, Message};
use example_orders_sqlite::{open_database, start, OrderPlaced};

/// The billing service: a consumer of the orders service's `orders` topic.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// The orders service's database, whose outbox is read (it must exist: start the producer first).
    #[arg(long, env = "ORDERS_DB", default_value = "orders.db")]
    orders_db: String,
    /// The billing service's own database (created if missing).
    #[arg(long, env = "BILLING_DB", default_value = "billing.db")]
    db: String,
    /// The consumer's name: its inbox, dead letters and read position are kept under it.
    #[arg(long, env = "BILLING_CONSUMER", default_value = "billing")]
    name: String,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9465.
    #[arg(long, env = "BILLING_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

/// The service's own table, written only by the handler.
const CREATE_LEDGER: &str = "CREATE TABLE IF NOT EXISTS ledger (
    order_id INTEGER NOT NULL,
    customer TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    message_id TEXT NOT NULL
)";

struct Billing;

impl Handler<sqlx::Transaction<'static, sqlx::Sqlite>> for Billing {
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        msg: &Message,
    ) -> Result<(), HandlerError> {
        match msg.message_type.as_str() {
            "OrderPlaced" => {
                let o: OrderPlaced = msg.decode_json()?; // bad payload → dead letter
                sqlx::query("INSERT INTO ledger (order_id, customer, amount_cents, message_id) VALUES (?, ?, ?, ?)")
                    .bind(o.order_id)
                    .bind(&o.customer)
                    .bind(o.amount_cents)
                    .bind(msg.id.to_string())
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
    let orders = open_existing(&args.orders_db)
        .await
        .context("cannot read the orders service's outbox; start the producer first")?;
    let billing = open_database(&args.db).await?; // with custody's tables (inbox, dead letters)
    sqlx::query(CREATE_LEDGER).execute(&billing).await?;

    let topics = ["orders".to_owned()];
    let sub = SqliteEmbeddedSubscriber::new(orders, &args.name, &topics).await?;
    let cancel = custody::shutdown_token(); // cancelled on SIGINT or SIGTERM
    let consumer = Consumer::new(
        SqliteInbox::new(billing),
        sub,
        Billing,
        ConsumerConfig::new(&args.name),
    );
    let stats = consumer.run(cancel).await?; // until SIGINT/SIGTERM, then drains
    println!(
        "consumer stopped: processed {}, duplicates {}, dead-lettered {}",
        stats.processed, stats.duplicates, stats.dead_lettered
    );
    Ok(())
}
