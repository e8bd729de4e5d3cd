//! `outbox`: producers commit a business row + an outbox message on
//! PostgreSQL, the relay publishes to NATS JetStream, a consumer applies the
//! effect through its inbox on a second PostgreSQL database.
//!
//! Ceilings, measured in the same run: (a) PostgreSQL committing the same
//! business-row inserts without the outbox, same concurrency; (b) raw
//! async-nats JetStream publish-with-ack of the same message size.

use std::sync::Arc;
use std::time::Duration;

use custody::nats::{NatsPublisher, NatsSubscriber, StreamSpec};
use custody::postgres::{PgInbox, PgOutbox};
use custody::{CancellationToken, Consumer, Handler, HandlerError, Message, Relay};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use custody_scenario::services::{delete_stream, run_tag, with_databases};

use super::cpu::CpuMeter;

use super::{
    key_of, pg_pool, pipeline_phases, raw_jetstream, timed_rate, warmed_rate, BenchArgs, Report,
    Stamps, Target, TimedInbox, TimedTx,
};

/// Ordering keys the messages are spread over.
pub const KEYS: u64 = 1000;
/// PubAcks outstanding in the raw JetStream ceiling: the relay's default
/// `max-concurrent-keys`, and four times that.
pub const RAW_WINDOWS: [usize; 2] = [64, 256];

const ORDERS: &str = "CREATE TABLE IF NOT EXISTS {T} (
    id UUID PRIMARY KEY, customer TEXT NOT NULL, data BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now())";
const LEDGER: &str = "CREATE TABLE IF NOT EXISTS ledger (
    entry BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, message_id UUID NOT NULL, bytes INT NOT NULL)";

pub async fn run(args: &BenchArgs, report: &mut Report) -> anyhow::Result<()> {
    let tag = run_tag();
    let names = [
        format!("custody_bench_{tag}_a"),
        format!("custody_bench_{tag}_b"),
    ];
    let stream = format!("CUSTODY_BENCH_{tag}");
    with_databases(&args.postgres, &names, |urls| async move {
        let result = measure(args, report, &urls[0], &urls[1], &stream, &tag).await;
        delete_stream(&args.nats, &stream).await;
        result
    })
    .await
}

/// Commit one business row (no outbox): the ceiling (a) transaction.
async fn commit_row(pool: &PgPool, table: &str, i: u64, data: &[u8]) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "INSERT INTO {table} (id, customer, data) VALUES ($1, $2, $3)"
    ))
    .bind(Uuid::now_v7())
    .bind(key_of(i, KEYS))
    .bind(data)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The benchmark's message for business row `i`.
pub fn message(i: u64, data: &[u8]) -> anyhow::Result<Message> {
    Ok(Message::builder("orders", key_of(i, KEYS), "OrderPlaced")
        .id(Uuid::now_v7())
        .payload("application/octet-stream", data.to_vec())
        .build()?)
}

async fn measure(
    args: &BenchArgs,
    report: &mut Report,
    a_url: &str,
    b_url: &str,
    stream: &str,
    tag: &str,
) -> anyhow::Result<()> {
    let n = args.messages_or(5_000, 50_000);
    let producers = args.producers;
    report.param("messages", n);
    report.param("keys", KEYS);
    report.param("relay", serde_json::to_value(args.relay_config())?);

    let pool_size = u32::try_from(producers)
        .unwrap_or(u32::MAX)
        .saturating_add(2);
    let a = pg_pool(a_url, pool_size).await?;
    let b = pg_pool(b_url, 4).await?;
    custody::postgres::migrate(&a).await?;
    custody::postgres::migrate(&b).await?;
    for t in ["orders", "orders_ceiling"] {
        sqlx::query(&ORDERS.replace("{T}", t)).execute(&a).await?;
    }
    sqlx::query(LEDGER).execute(&b).await?;
    let data: Arc<[u8]> = vec![b'x'; args.payload_bytes].into();

    // (a) PostgreSQL commits of the business rows alone
    let op = {
        let (a, data) = (a.clone(), data.clone());
        move |i| {
            let (a, data) = (a.clone(), data.clone());
            async move { commit_row(&a, "orders_ceiling", i, &data).await }
        }
    };
    let ceiling_a = warmed_rate(
        report,
        producers,
        n,
        "ceiling (a): warm-up",
        "ceiling (a): PostgreSQL commits, business row only",
        &format!("ceiling (a): PostgreSQL business-row commits, {producers} producers"),
        op,
    )
    .await?;

    // What the outbox adds to a producer's commit, without relay or consumer
    // running: the outbox insert (five indexes), then NOTIFY (a commit of a
    // notifying transaction takes a cluster-wide lock). Rows are deleted after.
    // Then the same with and without the per-key advisory locks: their cost
    // as a same-run ratio (docs/BENCHMARKS.md).
    for (notify, key_locks) in [(false, true), (false, false), (true, true), (true, false)] {
        let outbox = producer_outbox(args, &a)
            .with_notify(notify)
            .with_key_locks(key_locks);
        let op = {
            let (a, data) = (a.clone(), data.clone());
            move |i| {
                let (a, data, outbox) = (a.clone(), data.clone(), outbox.clone());
                async move {
                    let msg = message(i, &data)?;
                    let mut tx = a.begin().await?;
                    sqlx::query(
                        "INSERT INTO orders_ceiling (id, customer, data) VALUES ($1, $2, $3)",
                    )
                    .bind(msg.id)
                    .bind(&msg.key)
                    .bind(&data[..])
                    .execute(&mut *tx)
                    .await?;
                    outbox.enqueue(&mut tx, &msg).await?;
                    tx.commit().await?;
                    Ok(())
                }
            }
        };
        let what = match (notify, key_locks) {
            (false, true) => "NOTIFY off",
            (false, false) => "NOTIFY off, no key locks",
            (true, true) => "NOTIFY on",
            (true, false) => "NOTIFY on, no key locks",
        };
        timed_rate(
            report,
            producers,
            n,
            &format!("producer commits, row + outbox, {what}"),
            &format!("row + outbox commits alone, {what}, {producers} producers"),
            op,
        )
        .await?;
    }
    sqlx::query("DELETE FROM custody_outbox")
        .execute(&a)
        .await?;
    // one committer: what a consumer that commits each message alone can reach
    let one = (n / 5).max(100);
    let op = {
        let (a, data) = (a.clone(), data.clone());
        move |i| {
            let (a, data) = (a.clone(), data.clone());
            async move { commit_row(&a, "orders_ceiling", i, &data).await }
        }
    };
    let single = timed_rate(
        report,
        1,
        one,
        "PostgreSQL commits, business row only, 1 producer",
        "PostgreSQL business-row commits, 1 producer (serial)",
        op,
    )
    .await?;

    // (b) raw JetStream publish with acks, same headers and payload size
    let client = custody::nats::connect(&args.nats).await?;
    let spec = StreamSpec::new(stream, &format!("custody_bench_{tag}"));
    custody::nats::ensure_stream(&client, &spec).await?;
    let template = message(0, &data)?;
    let raw_subject = spec.subject("raw");
    let raw_n = n.max(20_000);
    raw_jetstream(&client, &raw_subject, &template, 1000, 64).await?; // warm-up
    let mut ceiling_b = 0.0f64;
    for w in RAW_WINDOWS {
        let meter = CpuMeter::start();
        let took = raw_jetstream(&client, &raw_subject, &template, raw_n, w).await?;
        let name = format!("ceiling (b): raw JetStream publish+ack, {w} in flight");
        report.cpu(&name, meter.stop(), raw_n);
        let r = report.rate(&name, raw_n, took);
        ceiling_b = ceiling_b.max(r);
    }

    // the pipeline
    let stamps = Stamps::new()?;
    let cancel = CancellationToken::new();
    let relay_pool = pg_pool(a_url, 4).await?;
    let relay = Relay::new(
        PgOutbox::new(relay_pool),
        NatsPublisher::new(client.clone(), &spec),
        args.relay_config(),
    )
    .with_id(format!("bench-{tag}"));
    let relay_task = tokio::spawn(relay.run(cancel.clone()));
    let sub = NatsSubscriber::new(client.clone(), &spec, "bench", &["orders".to_owned()]).await?;
    let inbox = TimedInbox {
        inner: PgInbox::new(b.clone()),
        stamps: stamps.clone(),
    };
    let consumer = Consumer::new(inbox, sub, PgLedger, args.consumer_config());
    let consumer_task = tokio::spawn(consumer.run(cancel.clone()));

    let outbox = producer_outbox(args, &a);
    let op = {
        let (a, data, stamps) = (a.clone(), data.clone(), stamps.clone());
        move |i| {
            let (a, data, stamps, outbox) =
                (a.clone(), data.clone(), stamps.clone(), outbox.clone());
            async move {
                let msg = message(i, &data)?;
                let mut tx = a.begin().await?;
                sqlx::query("INSERT INTO orders (id, customer, data) VALUES ($1, $2, $3)")
                    .bind(msg.id)
                    .bind(&msg.key)
                    .bind(&data[..])
                    .execute(&mut *tx)
                    .await?;
                outbox.enqueue(&mut tx, &msg).await?;
                tx.commit().await?;
                stamps.committed(msg.id);
                Ok(())
            }
        }
    };
    let phases = pipeline_phases(args, report, "outbox", &stamps, n, op).await;
    cancel.cancel();
    let relay_stats = tokio::time::timeout(Duration::from_secs(30), relay_task).await;
    let consumer_stats = tokio::time::timeout(Duration::from_secs(30), consumer_task).await;
    let phases = phases?;
    if let Ok(Ok(Ok(s))) = relay_stats {
        report.param("relay_batches", s.batches);
        report.param("relay_published", s.published);
    }
    if let Ok(Ok(Ok(s))) = consumer_stats {
        report.param("consumer_processed", s.processed);
        report.param("consumer_duplicates", s.duplicates);
    }

    relay_lag(report, &a, n).await?;
    report.compare(
        "outbox end to end",
        phases.e2e,
        "msg/s",
        Some(("(a) PG row commits", ceiling_a)),
        Some(Target::RatioAtLeast(0.8)),
    );
    report.compare(
        "outbox end to end",
        phases.e2e,
        "msg/s",
        Some(("(b) raw JetStream", ceiling_b)),
        None,
    );
    report.compare(
        "outbox end to end",
        phases.e2e,
        "msg/s",
        Some(("PG row commits, 1 producer", single)),
        None,
    );
    report.compare(
        "producer commits with outbox",
        phases.commits,
        "msg/s",
        Some(("(a) PG row commits", ceiling_a)),
        None,
    );
    report.compare(
        "p99 commit → processed, 50% load",
        phases.half_load_p99_ms,
        "ms",
        None,
        Some(Target::AtMostMs(20.0)),
    );
    a.close().await;
    b.close().await;
    Ok(())
}

/// The relay's share of the latency, from the outbox rows themselves
/// (PostgreSQL's clock): `published_at - enqueued_at`, where enqueued_at is
/// the start of the producer's transaction. Rows in position order: the
/// warm-up, then the `n` saturated ones, then the 50% load ones.
async fn relay_lag(report: &mut Report, a: &PgPool, n: u64) -> anyhow::Result<()> {
    let lags: Vec<i64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM published_at - enqueued_at) * 1000000)::BIGINT
         FROM custody_outbox WHERE status = 1 ORDER BY position",
    )
    .fetch_all(a)
    .await?;
    let warm = usize::try_from(super::warm_up(n))?;
    let n = usize::try_from(n)?;
    for (name, range) in [
        (
            "outbox: enqueue → published (relay), saturated",
            warm..warm + n,
        ),
        (
            "outbox: enqueue → published (relay), 50% load",
            warm + n..lags.len(),
        ),
    ] {
        let mut h = super::new_histogram()?;
        for lag in lags.get(range).unwrap_or_default() {
            h.saturating_record(u64::try_from(*lag).unwrap_or(0));
        }
        report.latency(super::Latency::from_micros(name, &h));
    }
    Ok(())
}

/// Service B's effect: one ledger row per message, in the inbox transaction.
pub struct PgLedger;

impl Handler<TimedTx<Transaction<'static, Postgres>>> for PgLedger {
    async fn handle(
        &self,
        tx: &mut TimedTx<Transaction<'static, Postgres>>,
        msg: &Message,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO ledger (message_id, bytes) VALUES ($1, $2)")
            .bind(msg.id)
            .bind(i32::try_from(msg.payload.len()).unwrap_or(i32::MAX))
            .execute(&mut *tx.tx)
            .await
            .map_err(HandlerError::transient)?;
        Ok(())
    }
}

/// The producers' outbox: the library's NOTIFY interval unless
/// `--notify-interval-ms` says otherwise.
fn producer_outbox(args: &BenchArgs, pool: &PgPool) -> PgOutbox {
    let outbox = PgOutbox::new(pool.clone()).with_key_locks(!args.no_key_locks);
    match args.notify_interval_ms {
        Some(ms) => outbox.with_notify_interval(Duration::from_millis(ms)),
        None => outbox,
    }
}
