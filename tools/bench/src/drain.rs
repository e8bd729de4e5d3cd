//! `relay-drain`: a backlog of outbox rows (as left by a NATS outage)
//! drained to JetStream by one relay: messages/s against raw JetStream
//! publish-with-ack (ceiling b), time to clear, and the process's peak RSS
//! while draining.

use std::time::Duration;

use custody::nats::{NatsPublisher, StreamSpec};
use custody::postgres::{PgOutbox, DEFAULT_PARTITIONS};
use custody::{partition_for, CancellationToken, Relay};
use sqlx::PgPool;
use tokio::time::Instant;
use uuid::Uuid;

use super::cpu::CpuMeter;
use super::outbox::{message, KEYS, RAW_WINDOWS};
use custody_scenario::services::{delete_stream, run_tag, with_databases};

use super::{
    bar, key_of, pg_pool, phase_limit, raw_jetstream, BenchArgs, Report, RssSampler, Target,
};

/// Rows per pre-fill statement.
const FILL_CHUNK: u64 = 50_000;

// The rows the relay would find after an outage: pending, keys spread over
// KEYS ordering keys with the partition custody's hash gives them.
const FILL: &str = "\
INSERT INTO custody_outbox
    (id, kind, topic, msg_key, partition, message_type, content_type, headers, payload, created_at)
SELECT t.id, 'event', 'orders', 'key-' || lpad(((t.g - 1 + $2) % $3)::text, 4, '0'),
       ($4::int[])[((t.g - 1 + $2) % $3) + 1], 'OrderPlaced', 'application/octet-stream', '{}',
       $5, now()
FROM UNNEST($1::uuid[]) WITH ORDINALITY AS t(id, g)
ORDER BY t.g";

pub async fn run(args: &BenchArgs, report: &mut Report) -> anyhow::Result<()> {
    let tag = run_tag();
    let names = [format!("custody_bench_{tag}_a")];
    let stream = format!("CUSTODY_BENCH_{tag}");
    with_databases(&args.postgres, &names, |urls| async move {
        let result = measure(args, report, &urls[0], &stream, &tag).await;
        delete_stream(&args.nats, &stream).await;
        result
    })
    .await
}

async fn fill(pool: &PgPool, n: u64, payload: &[u8]) -> anyhow::Result<()> {
    let partitions: Vec<i32> = (0..KEYS)
        .map(|k| i32::try_from(partition_for(&key_of(k, KEYS), DEFAULT_PARTITIONS)).unwrap_or(0))
        .collect();
    let b = bar(n, "pre-filling the outbox backlog");
    let mut done = 0u64;
    while done < n {
        let count = FILL_CHUNK.min(n - done);
        let ids: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
        sqlx::query(FILL)
            .bind(&ids)
            .bind(i64::try_from(done)?)
            .bind(i64::try_from(KEYS)?)
            .bind(&partitions)
            .bind(payload)
            .execute(pool)
            .await?;
        done += count;
        b.set_position(done);
    }
    b.finish_and_clear();
    // autovacuum would have visited the table during a real outage
    sqlx::query("VACUUM ANALYZE custody_outbox")
        .execute(pool)
        .await?;
    Ok(())
}

async fn pending(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM custody_outbox WHERE status = 0")
            .fetch_one(pool)
            .await?,
    )
}

async fn measure(
    args: &BenchArgs,
    report: &mut Report,
    url: &str,
    stream: &str,
    tag: &str,
) -> anyhow::Result<()> {
    let n = args.messages_or(100_000, 1_000_000);
    report.param("backlog", n);
    report.param("keys", KEYS);
    report.param("relay", serde_json::to_value(args.relay_config())?);
    let pool = pg_pool(url, 4).await?;
    custody::postgres::migrate(&pool).await?;
    let payload = vec![b'x'; args.payload_bytes];
    let fill_started = Instant::now();
    fill(&pool, n, &payload).await?;
    report.note(format!(
        "backlog of {n} rows pre-filled with SQL in {:.1}s (not part of any figure)",
        fill_started.elapsed().as_secs_f64()
    ));

    // (b) raw JetStream publish with acks, same headers and payload size
    let client = custody::nats::connect(&args.nats).await?;
    let spec = StreamSpec::new(stream, &format!("custody_bench_{tag}"));
    custody::nats::ensure_stream(&client, &spec).await?;
    let template = message(0, &payload)?;
    let raw_subject = spec.subject("raw");
    let raw_n = (n / 5).clamp(20_000, 200_000);
    raw_jetstream(&client, &raw_subject, &template, 1000, 64).await?; // warm-up
    let mut ceiling_b = 0.0f64;
    let mut ceiling_cpu = None;
    for w in RAW_WINDOWS {
        let meter = CpuMeter::start();
        let took = raw_jetstream(&client, &raw_subject, &template, raw_n, w).await?;
        let cpu = meter.stop();
        let r = report.rate(
            &format!("ceiling (b): raw JetStream publish+ack, {w} in flight"),
            raw_n,
            took,
        );
        if r > ceiling_b {
            ceiling_b = r;
            ceiling_cpu = cpu;
        }
    }
    let js = async_nats::jetstream::new(client.clone());
    let mut js_stream = js.get_stream(stream).await?;
    let before = js_stream.info().await?.state.messages;

    // the drain
    let rss_before = super::rss_mib().unwrap_or(0.0);
    let sampler = RssSampler::start();
    let cancel = CancellationToken::new();
    let relay = Relay::new(
        PgOutbox::new(pool.clone()),
        NatsPublisher::new(client.clone(), &spec),
        args.relay_config(),
    )
    .with_id(format!("bench-{tag}"));
    let b = bar(n, "relay draining the backlog to JetStream");
    let meter = CpuMeter::start();
    let start = Instant::now();
    let relay_task = tokio::spawn(relay.run(cancel.clone()));
    let deadline = start + phase_limit(args);
    let drained = loop {
        let stored = js_stream
            .info()
            .await?
            .state
            .messages
            .saturating_sub(before);
        b.set_position(stored);
        if stored >= n && pending(&pool).await? == 0 {
            break Ok(start.elapsed());
        }
        if relay_task.is_finished() {
            break Err(anyhow::anyhow!(
                "the relay stopped after {stored} of {n} messages"
            ));
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "only {stored} of {n} messages drained after {}s",
                phase_limit(args).as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(if stored >= n { 10 } else { 200 })).await;
    };
    b.finish_and_clear();
    let drain_cpu = meter.stop();
    cancel.cancel();
    let stats = tokio::time::timeout(Duration::from_secs(30), relay_task).await;
    let rss_max = sampler.stop().await;
    let took = drained?;
    if let Ok(Ok(Ok(s))) = stats {
        report.param("relay_batches", s.batches);
        report.param("relay_published", s.published);
        report.param("relay_duplicates", s.duplicates);
    }
    let rate = report.rate("relay drain to JetStream (published and marked)", n, took);
    report.compare(
        "relay drain",
        rate,
        "msg/s",
        Some(("(b) raw JetStream", ceiling_b)),
        Some(Target::RatioAtLeast(0.7)),
    );
    report.compare(
        &format!("time to clear {n} backlog"),
        took.as_secs_f64(),
        "s",
        None,
        None,
    );
    report.compare(
        "peak RSS while draining",
        rss_max,
        "MiB",
        None,
        Some(Target::BelowMib(100.0)),
    );
    report.param("rss_before_drain_mib", rss_before);
    report.note(format!(
        "RSS is the whole bench process (relay + sampler + NATS client), {rss_before:.1} MiB before the relay started"
    ));
    report.note(format!(
        "with producers still committing R msg/s, a backlog of B clears in B / ({rate:.0} - R) s"
    ));
    report.cpu("relay drain", drain_cpu, n);
    report.cpu("ceiling (b), its fastest window", ceiling_cpu, raw_n);
    pool.close().await;
    Ok(())
}
