//! The demo on the real components: A and B on PostgreSQL (two databases),
//! the relay publishing A's outbox to NATS JetStream, B consuming from it.

use std::time::{Duration, Instant};

use anyhow::Context;
use custody::nats::{NatsPublisher, NatsSubscriber, StreamSpec};
use custody::postgres::{self, PgInbox, PgOutbox};
use custody::{Consumer, ConsumerConfig, Message, MessageKind, Relay, RelayConfig};
use sqlx::{Connection, PgPool, Row};
use uuid::Uuid;

use super::billing::{PgBilling, A_SCHEMA_PG, B_SCHEMA_PG};
use super::embedded::Run;
use super::report::{Observed, Report};
use super::{DemoArgs, OrderPlaced, Step, Worker, WorkerArgs, Workload};

const CONSUMER: &str = "billing";

/// `postgres://u@h:p/db` → `postgres://u@h:p/<name>`.
pub(crate) fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// Fresh databases for A and B, dropped at the end.
pub(crate) struct Databases {
    server: String,
    names: Vec<String>,
}

impl Databases {
    pub(crate) async fn create(server: &str, names: &[String]) -> anyhow::Result<Databases> {
        let mut c = sqlx::PgConnection::connect(server).await.with_context(|| {
            format!(
                "cannot connect to PostgreSQL at {}",
                crate::ops::redact(server)
            )
        })?;
        for n in names {
            sqlx::query(&format!("CREATE DATABASE {n}"))
                .execute(&mut c)
                .await?;
        }
        Ok(Databases {
            server: server.to_owned(),
            names: names.to_vec(),
        })
    }

    pub(crate) async fn drop_all(&self) {
        if let Ok(mut c) = sqlx::PgConnection::connect(&self.server).await {
            for n in &self.names {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {n} WITH (FORCE)"))
                    .execute(&mut c)
                    .await;
            }
        }
    }
}

pub async fn run(args: &DemoArgs, seed: u64, pg: &str, nats: &str) -> anyhow::Result<Report> {
    let tag = &Uuid::now_v7().simple().to_string()[16..];
    let a_name = format!("custody_demo_a_{tag}");
    let b_name = format!("custody_demo_b_{tag}");
    let dbs = Databases::create(pg, &[a_name.clone(), b_name.clone()]).await?;
    let stream = format!("CUSTODY_DEMO_{tag}");
    let prefix = format!("custody_demo_{tag}");
    let result = run_inner(args, seed, pg, nats, &a_name, &b_name, &stream, &prefix).await;
    // clean up whatever happened
    if let Ok(client) = custody::nats::connect(nats).await {
        let js = async_nats::jetstream::new(client);
        let _ = js.delete_stream(&stream).await;
    }
    dbs.drop_all().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_inner(
    args: &DemoArgs,
    seed: u64,
    pg: &str,
    nats: &str,
    a_name: &str,
    b_name: &str,
    stream: &str,
    prefix: &str,
) -> anyhow::Result<Report> {
    let a_url = with_database(pg, a_name);
    let b_url = with_database(pg, b_name);
    let a = postgres::connect(&a_url).await?;
    let b = postgres::connect(&b_url).await?;
    postgres::migrate(&a).await?;
    postgres::migrate(&b).await?;
    sqlx::query(A_SCHEMA_PG).execute(&a).await?;
    sqlx::query(B_SCHEMA_PG).execute(&b).await?;
    let client = custody::nats::connect(nats).await?;
    let spec = StreamSpec::new(stream, prefix);
    custody::nats::ensure_stream(&client, &spec).await?;
    let outbox = PgOutbox::new(a.clone());

    eprintln!(
        "custody demo: service A (PostgreSQL {a_name}) → relay → NATS JetStream {stream} → service B (PostgreSQL {b_name}); {} orders over {} customers, seed {seed}",
        args.messages, args.customers
    );
    let common = |role: &str| {
        vec![
            "--role".to_owned(),
            role.to_owned(),
            "--a".to_owned(),
            a_url.clone(),
            "--b".to_owned(),
            b_url.clone(),
            "--nats".to_owned(),
            nats.to_owned(),
            "--stream".to_owned(),
            stream.to_owned(),
            "--prefix".to_owned(),
            prefix.to_owned(),
        ]
    };
    let mut relay = Worker::spawn(common("relay-pg"))?;
    let mut consumer = Worker::spawn(common("consume-pg"))?;
    let mut run = Run::new(args.messages);
    let mut workload = Workload::new(seed, args.messages, args.customers);
    let mut rolled_back = Vec::new();

    for i in 0..args.messages {
        if i == args.messages / 5 {
            consumer.kill9().await?;
            run.fault("service B down: consumer killed with SIGKILL, kept down 2s while A keeps committing".into());
            tokio::time::sleep(Duration::from_secs(2)).await;
            consumer.restart()?;
        }
        if i == args.messages * 2 / 5 {
            relay.kill9().await?;
            run.fault(
                "relay killed with SIGKILL mid-batch (published, not yet marked) and restarted"
                    .into(),
            );
            relay.restart()?;
        }
        if i == args.messages * 3 / 5 {
            let n = republish_recent(&a, &client, &spec, 30).await?;
            run.fault(format!(
                "{n} already-delivered messages published to JetStream again under new broker ids (they are delivered twice)"
            ));
        }
        if i == args.messages * 3 / 4 {
            relay.kill9().await?;
            consumer.kill9().await?;
            run.fault("relay and consumer both killed with SIGKILL; restarted after 1s".into());
            tokio::time::sleep(Duration::from_secs(1)).await;
            relay.restart()?;
            consumer.restart()?;
        }
        produce(&a, &outbox, workload.step(i), &mut rolled_back).await?;
        if i % 50 == 0 {
            relay.check_alive()?;
            consumer.check_alive()?;
            run.bar.set_position(processed(&b).await.unwrap_or(0));
        }
    }
    run.bar.set_message("A finished; waiting for B to drain");
    let expected: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM custody_outbox WHERE topic = 'orders'")
            .fetch_one(&a)
            .await?;
    run.bar.set_length(expected as u64);
    let deadline = Instant::now() + args.timeout;
    loop {
        let done = processed(&b).await.unwrap_or(0);
        run.bar.set_position(done);
        if done >= expected as u64 || Instant::now() > deadline {
            break;
        }
        relay.check_alive()?;
        consumer.check_alive()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = run.started.elapsed();
    relay.kill9().await?;
    consumer.kill9().await?;
    run.bar.finish_and_clear();
    let obs = observe(&a, &b).await?;
    a.close().await;
    b.close().await;
    Ok(Report::compute(
        "PostgreSQL + NATS JetStream, relay and consumer as separate processes".into(),
        seed,
        run.faults,
        &rolled_back,
        &obs,
        elapsed,
    ))
}

/// Publish the `n` most recently published messages again with fresh
/// `Nats-Msg-Id`s, so JetStream stores and delivers them a second time.
async fn republish_recent(
    a: &PgPool,
    client: &async_nats::Client,
    spec: &StreamSpec,
    n: i64,
) -> anyhow::Result<usize> {
    let rows = sqlx::query(
        "SELECT id, kind, topic, msg_key, message_type, content_type, headers, payload, created_at
         FROM custody_outbox WHERE status = 1 AND topic = 'orders' ORDER BY position DESC LIMIT $1",
    )
    .bind(n)
    .fetch_all(a)
    .await?;
    let js = async_nats::jetstream::new(client.clone());
    let mut count = 0;
    for r in rows.iter().rev() {
        let kind: String = r.try_get("kind")?;
        let headers: String = r.try_get("headers")?;
        let msg = Message {
            id: r.try_get("id")?,
            kind: kind.parse::<MessageKind>()?,
            topic: r.try_get("topic")?,
            key: r.try_get("msg_key")?,
            message_type: r.try_get("message_type")?,
            content_type: r.try_get("content_type")?,
            payload: r.try_get("payload")?,
            headers: serde_json::from_str(&headers)?,
            created_at: r.try_get("created_at")?,
        };
        let mut h = custody::nats::encode_headers(&msg);
        h.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("redelivery-{}", Uuid::now_v7()).as_str(),
        );
        js.publish_with_headers(
            format!("{}.{}", spec.subject_prefix, msg.topic),
            h,
            msg.payload.clone().into(),
        )
        .await?
        .await?;
        count += 1;
    }
    Ok(count)
}

async fn processed(b: &PgPool) -> anyhow::Result<u64> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM custody_inbox WHERE consumer = $1")
        .bind(CONSUMER)
        .fetch_one(b)
        .await?;
    Ok(n as u64)
}

async fn produce(
    a: &PgPool,
    outbox: &PgOutbox,
    step: Step,
    rolled_back: &mut Vec<Uuid>,
) -> anyhow::Result<()> {
    let mut tx = a.begin().await?;
    match &step {
        Step::Order { customer } | Step::RolledBack { customer } => {
            let order_id = Uuid::now_v7();
            let amount_cents = 100 + (order_id.as_u128() % 9_900) as i64;
            // one producer: seq per customer in commit order
            let seq: i64 = sqlx::query(
                "INSERT INTO orders (order_id, customer, amount_cents, seq)
                 VALUES ($1, $2, $3, (SELECT COALESCE(MAX(seq), 0) + 1 FROM orders WHERE customer = $2))
                 RETURNING seq",
            )
            .bind(order_id)
            .bind(customer)
            .bind(amount_cents)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
            let event = OrderPlaced {
                order_id,
                customer: customer.clone(),
                amount_cents,
                seq,
            };
            let msg = Message::builder("orders", customer.clone(), "OrderPlaced")
                .json(&event)?
                .build()?;
            outbox.enqueue(&mut tx, &msg).await?;
            if matches!(step, Step::RolledBack { .. }) {
                tx.rollback().await?;
                rolled_back.push(order_id);
                return Ok(());
            }
        }
        Step::Malformed => {
            let msg = Message::builder("orders", "customer-bad", "OrderPlaced")
                .payload(custody::CONTENT_TYPE_JSON, b"{\"order_id\": oops".to_vec())
                .build()?;
            outbox.enqueue(&mut tx, &msg).await?;
        }
        Step::UnknownType => {
            let msg = Message::builder("orders", "customer-gift", "OrderGiftWrapped")
                .json(&serde_json::json!({ "ribbon": "red" }))?
                .build()?;
            outbox.enqueue(&mut tx, &msg).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

pub(crate) async fn observe(a: &PgPool, b: &PgPool) -> anyhow::Result<Observed> {
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
    Ok(obs)
}

/// The relay process: A's outbox → NATS.
pub async fn relay(args: &WorkerArgs) -> anyhow::Result<()> {
    let a = postgres::connect(&args.a).await?;
    let client = custody::nats::connect(&args.nats).await?;
    let spec = StreamSpec::new(&args.stream, &args.prefix);
    let publisher = NatsPublisher::new(client, &spec);
    let cfg = RelayConfig {
        poll_interval: Duration::from_millis(200),
        lease_ttl: Duration::from_secs(3),
        ..RelayConfig::default()
    };
    // a fixed id (`--id`, default demo-relay): the restarted relay takes its own leases back at once
    Relay::new(PgOutbox::new(a), publisher, cfg)
        .with_id(args.id.clone())
        .run(crate::ops::shutdown_token())
        .await?;
    Ok(())
}

/// The billing consumer process: NATS → B's inbox + ledger.
pub async fn consume(args: &WorkerArgs) -> anyhow::Result<()> {
    let b = postgres::connect(&args.b).await?;
    let client = custody::nats::connect(&args.nats).await?;
    let spec = StreamSpec::new(&args.stream, &args.prefix);
    let sub = NatsSubscriber::new(client, &spec, CONSUMER, &["orders".to_owned()]).await?;
    let handler = PgBilling {
        outbox: PgOutbox::new(b.clone()),
    };
    let mut cfg = ConsumerConfig::new(CONSUMER);
    cfg.fetch_wait = Duration::from_millis(200);
    Consumer::new(PgInbox::new(b), sub, handler, cfg)
        .run(crate::ops::shutdown_token())
        .await?;
    Ok(())
}
