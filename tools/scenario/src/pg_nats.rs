//! Services A and B on the real components: A and B on PostgreSQL (two
//! databases), the relay publishing A's outbox to NATS JetStream, B consuming
//! from it. Setup, the relay and billing consumer roles and the observation
//! the report is computed from, shared by the demo and chaos.

use std::time::Duration;

use custody::nats::{NatsPublisher, NatsSubscriber, StreamSpec};
use custody::postgres::{self, PgInbox, PgOutbox};
use custody::{Consumer, ConsumerConfig, InboxStore, Relay, RelayConfig};
use sqlx::{PgPool, Row};

use crate::billing::{PgBilling, A_SCHEMA_PG, B_SCHEMA_PG};
use crate::report::Observed;
use crate::WorkerArgs;

/// The billing consumer's name (inbox, dead letters, durable).
pub const CONSUMER: &str = "billing";

/// Connect to A's and B's databases, migrate both and create the services' tables.
pub async fn setup(a_url: &str, b_url: &str) -> anyhow::Result<(PgPool, PgPool)> {
    let a = postgres::connect(a_url).await?;
    let b = postgres::connect(b_url).await?;
    postgres::migrate(&a).await?;
    postgres::migrate(&b).await?;
    sqlx::query(A_SCHEMA_PG).execute(&a).await?;
    sqlx::query(B_SCHEMA_PG).execute(&b).await?;
    Ok((a, b))
}

/// Messages B has settled (processed or dead-lettered with an id).
pub async fn processed(b: &PgPool) -> anyhow::Result<u64> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM custody_inbox WHERE consumer = $1")
        .bind(CONSUMER)
        .fetch_one(b)
        .await?;
    Ok(n as u64)
}

/// What A's and B's databases hold, for the report.
pub async fn observe(a: &PgPool, b: &PgPool) -> anyhow::Result<Observed> {
    let mut obs = Observed::default();
    for r in sqlx::query(
        "SELECT id, message_type FROM custody_outbox WHERE topic = 'orders' ORDER BY position",
    )
    .fetch_all(a)
    .await?
    {
        obs.a_outbox.push((r.try_get(0)?, r.try_get(1)?));
    }
    for r in sqlx::query("SELECT order_id, customer, seq FROM orders")
        .fetch_all(a)
        .await?
    {
        obs.a_orders
            .push((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?));
    }
    for r in sqlx::query("SELECT order_id, customer, seq FROM ledger ORDER BY entry")
        .fetch_all(b)
        .await?
    {
        obs.b_ledger
            .push((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?));
    }
    for r in
        sqlx::query("SELECT message_id, duplicates::BIGINT FROM custody_inbox WHERE consumer = $1")
            .bind(CONSUMER)
            .fetch_all(b)
            .await?
    {
        obs.b_inbox.push((r.try_get(0)?, r.try_get(1)?));
    }
    for d in postgres::dead_letters(b).await? {
        obs.b_dead.push((d.message_id, d.error));
    }
    let inv: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM custody_outbox WHERE topic = 'invoices'")
            .fetch_one(b)
            .await?;
    obs.b_invoices = inv as u64;
    let progress = InboxStore::progress(&PgInbox::new(b.clone()), CONSUMER).await?;
    obs.b_sequences = Some((
        progress.len() as u64,
        progress.iter().map(|p| p.holes).sum(),
    ));
    Ok(obs)
}

/// The relay process: A's outbox → NATS.
pub async fn relay(args: &WorkerArgs) -> anyhow::Result<()> {
    let a = postgres::connect(&args.a).await?;
    let client = custody::nats::connect(&args.nats).await?;
    let spec = StreamSpec::new(&args.stream, &args.subject_prefix);
    let publisher = NatsPublisher::new(client, &spec);
    let cfg = RelayConfig {
        poll_interval: Duration::from_millis(200),
        lease_ttl: Duration::from_secs(3),
        ..RelayConfig::default()
    };
    // a fixed id (`--id`, default demo-relay): the restarted relay takes its own leases back at once
    Relay::new(PgOutbox::new(a), publisher, cfg)
        .with_id(args.id.clone())
        .run(crate::process::shutdown_token())
        .await?;
    Ok(())
}

/// The billing consumer process: NATS → B's inbox + ledger.
pub async fn consume(args: &WorkerArgs) -> anyhow::Result<()> {
    let b = postgres::connect(&args.b).await?;
    let client = custody::nats::connect(&args.nats).await?;
    let spec = StreamSpec::new(&args.stream, &args.subject_prefix);
    let sub = NatsSubscriber::new(client, &spec, CONSUMER, &["orders".to_owned()]).await?;
    let handler = PgBilling {
        outbox: PgOutbox::new(b.clone()),
    };
    let mut cfg = ConsumerConfig::new(CONSUMER);
    cfg.fetch_wait = Duration::from_millis(200);
    Consumer::new(PgInbox::new(b), sub, handler, cfg)
        .run(crate::process::shutdown_token())
        .await?;
    Ok(())
}
