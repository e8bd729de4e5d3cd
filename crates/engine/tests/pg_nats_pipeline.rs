//! End to end on the real components: PostgreSQL outbox → relay → NATS
//! JetStream → consumer → PostgreSQL inbox. Each test has its own databases
//! and its own stream; broker faults use a test-owned nats-server.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env, step_message, verdict, CrashAfterPublish, Env, Recorder};
use custody_core::Message;
use custody_engine::{CancellationToken, Consumer, ConsumerConfig, Relay, RelayConfig};
use custody_nats::{NatsPublisher, NatsSubscriber};
use custody_postgres::{PgInbox, PgOutbox};
use custody_testkit::NatsServer;
use sqlx::Row;

impl Env {
    async fn cleanup(&self) {
        let js = async_nats::jetstream::new(self.client.clone());
        let _ = js.delete_stream(&self.spec.name).await;
    }

    fn relay_config() -> RelayConfig {
        RelayConfig {
            poll_interval: Duration::from_millis(50),
            lease_ttl: Duration::from_secs(2),
            ..RelayConfig::default()
        }
    }

    async fn consumer(
        &self,
        rec: Recorder,
    ) -> anyhow::Result<Consumer<PgInbox, NatsSubscriber, Recorder>> {
        let sub = self.billing_subscriber().await?;
        let mut cfg = ConsumerConfig::new("billing");
        cfg.fetch_wait = Duration::from_millis(200);
        cfg.batch_size = 200;
        Ok(Consumer::new(PgInbox::new(self.b.clone()), sub, rec, cfg))
    }

    async fn effects(&self) -> anyhow::Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query("SELECT message_id::text, k, seq FROM effects ORDER BY n")
            .fetch_all(&self.b)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    async fn count(&self, sql: &str) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.a).await?)
    }

    /// Run the consumer until `n` effects exist or `limit` passes.
    async fn consume_until(
        &self,
        c: &mut Consumer<PgInbox, NatsSubscriber, Recorder>,
        n: usize,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while self.effects().await?.len() < n && Instant::now() < deadline {
            c.run_once().await?;
        }
        Ok(())
    }
}

/// Step `relay` until it has published `n` messages (or 30 s pass). One
/// `step` returning 0 is not "done" on PostgreSQL: rows wait below the
/// cluster-wide snapshot xmin, which other databases' transactions (other
/// tests, other services on the server) hold back for a moment.
async fn drain<P: custody_core::Publisher>(
    relay: &mut Relay<PgOutbox, P>,
    n: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.stats().published < n && Instant::now() < deadline {
        if relay.step().await? == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

#[tokio::test]
async fn rollback_publishes_nothing_commit_publishes_exactly_one() -> anyhow::Result<()> {
    let Some(e) = env(None, "custody_e2e").await? else {
        return Ok(());
    };
    let mut tx = e.a.begin().await?;
    e.outbox
        .enqueue(&mut tx, &step_message("steps", "k", 1))
        .await?;
    tx.rollback().await?;
    let mut tx = e.a.begin().await?;
    let m = step_message("steps", "k", 1);
    e.outbox.enqueue(&mut tx, &m).await?;
    tx.commit().await?;

    let publisher = NatsPublisher::new(e.client.clone(), &e.spec);
    let mut relay = Relay::new(e.outbox.clone(), publisher, Env::relay_config());
    drain(&mut relay, 1).await?;
    assert_eq!(relay.stats().published, 1);
    let js = async_nats::jetstream::new(e.client.clone());
    let mut stream = js.get_stream(&e.spec.name).await?;
    assert_eq!(stream.info().await?.state.messages, 1);
    let mut c = e.consumer(Recorder::default()).await?;
    e.consume_until(&mut c, 1, Duration::from_secs(10)).await?;
    let eff = e.effects().await?;
    assert_eq!(eff.len(), 1);
    assert_eq!(eff[0].0, m.id.to_string());
    e.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn relay_killed_after_publish_before_mark_redelivers_and_effect_applies_once(
) -> anyhow::Result<()> {
    let Some(e) = env(None, "custody_e2e").await? else {
        return Ok(());
    };
    let msgs: Vec<Message> = (1..=20).map(|i| step_message("steps", "k", i)).collect();
    let mut tx = e.a.begin().await?;
    e.outbox.enqueue_batch(&mut tx, &msgs).await?;
    tx.commit().await?;

    let reached = Arc::new(tokio::sync::Notify::new());
    let crashing = CrashAfterPublish {
        inner: NatsPublisher::new(e.client.clone(), &e.spec),
        published: AtomicUsize::new(0),
        crash_after: 5,
        reached: reached.clone(),
    };
    let relay = Relay::new(e.outbox.clone(), crashing, Env::relay_config()).with_id("relay-1");
    let task = tokio::spawn(relay.run(CancellationToken::new()));
    tokio::time::timeout(Duration::from_secs(20), reached.notified()).await?;
    task.abort();
    let _ = task.await;
    // published to the broker, not marked: still pending in the outbox
    assert_eq!(
        e.count("SELECT COUNT(*) FROM custody_outbox WHERE status = 0")
            .await?,
        20
    );

    // the restarted relay (same id, so it takes its leases back) republishes
    let mut relay = Relay::new(
        e.outbox.clone(),
        NatsPublisher::new(e.client.clone(), &e.spec),
        Env::relay_config(),
    )
    .with_id("relay-1");
    drain(&mut relay, 20).await?;
    assert_eq!(relay.stats().published, 20);
    assert!(
        relay.stats().duplicates >= 5,
        "JetStream should recognise the republished ids: {:?}",
        relay.stats()
    );
    assert_eq!(
        e.count("SELECT COUNT(*) FROM custody_outbox WHERE status = 1")
            .await?,
        20
    );

    let mut c = e.consumer(Recorder::default()).await?;
    e.consume_until(&mut c, 20, Duration::from_secs(20)).await?;
    let v = verdict(&e.effects().await?);
    assert_eq!((v.applied, v.distinct, v.order_violations), (20, 20, 0));
    e.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn two_relays_share_one_outbox_10k_messages_100_keys_in_order() -> anyhow::Result<()> {
    let Some(e) = env(None, "custody_e2e").await? else {
        return Ok(());
    };
    let cancel = CancellationToken::new();
    let mut relays = Vec::new();
    for id in ["relay-a", "relay-b"] {
        let r = Relay::new(
            e.outbox.clone(),
            NatsPublisher::new(e.client.clone(), &e.spec),
            Env::relay_config(),
        )
        .with_id(id);
        relays.push(tokio::spawn(r.run(cancel.clone())));
    }
    // wait until the partitions are split between the two relays
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let owners: Vec<(String, i64)> = sqlx::query_as(
            "SELECT owner, COUNT(*) FROM custody_relay_lease WHERE owner IS NOT NULL AND expires_at > now() GROUP BY owner",
        )
        .fetch_all(&e.a)
        .await?;
        if owners.len() == 2 && owners.iter().all(|(_, n)| *n == 8) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "relays did not split the partitions: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 10,000 messages over 100 keys, committed in 20 transactions
    let mut seq = vec![0i64; 100];
    for t in 0..20 {
        let batch: Vec<Message> = (0..500)
            .map(|i| {
                let k = (t * 500 + i) % 100;
                seq[k] += 1;
                step_message("steps", &format!("key-{k:03}"), seq[k])
            })
            .collect();
        let mut tx = e.a.begin().await?;
        e.outbox.enqueue_batch(&mut tx, &batch).await?;
        tx.commit().await?;
    }

    let mut c = e.consumer(Recorder::default()).await?;
    e.consume_until(&mut c, 10_000, Duration::from_secs(240))
        .await?;
    cancel.cancel();
    let mut published = Vec::new();
    for r in relays {
        published.push(r.await??.published);
    }
    let v = verdict(&e.effects().await?);
    assert_eq!(v.applied, 10_000, "lost messages");
    assert_eq!(v.distinct, 10_000);
    assert_eq!(v.order_violations, 0);
    assert!(
        published.iter().all(|p| *p > 0),
        "both relays should have published: {published:?}"
    );
    assert_eq!(
        published.iter().sum::<u64>(),
        10_000,
        "no duplicate publishing in the normal path"
    );
    // two relays numbered the partitions they held: 1..n each, no repeats,
    // and the consumer saw every number (no gap, highest = count)
    let bad: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT partition FROM custody_outbox GROUP BY partition, topic
         HAVING COUNT(*) <> COUNT(DISTINCT seq) OR MIN(seq) <> 1 OR MAX(seq) <> COUNT(*)) x",
    )
    .fetch_one(&e.a)
    .await?;
    assert_eq!(bad, 0, "each partition numbered 1..n");
    let progress =
        custody_core::InboxStore::progress(&PgInbox::new(e.b.clone()), "billing").await?;
    assert_eq!(progress.len(), 16, "{progress:?}");
    assert!(progress.iter().all(|p| p.holes == 0), "{progress:?}");
    assert_eq!(progress.iter().map(|p| p.high).sum::<u64>(), 10_000);
    e.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn transport_down_backlog_grows_then_drains_nothing_lost() -> anyhow::Result<()> {
    let Some(mut server) = NatsServer::start().await? else {
        return Ok(());
    };
    let Some(e) = env(Some(&server.url), "custody_e2e").await? else {
        return Ok(());
    };
    let cancel = CancellationToken::new();
    let mut cfg = Env::relay_config();
    cfg.breaker.open_for = Duration::from_millis(500);
    let publisher =
        NatsPublisher::new(e.client.clone(), &e.spec).with_ack_timeout(Duration::from_secs(1));
    let relay = tokio::spawn(Relay::new(e.outbox.clone(), publisher, cfg).run(cancel.clone()));

    let produce = |from: i64, to: i64| {
        let e = &e;
        async move {
            for i in from..=to {
                let mut tx = e.a.begin().await?;
                e.outbox
                    .enqueue(
                        &mut tx,
                        &step_message("steps", &format!("key-{}", i % 7), i),
                    )
                    .await?;
                tx.commit().await?;
            }
            anyhow::Ok(())
        }
    };
    produce(1, 50).await?;
    server.stop(); // kill -9 of the broker
                   // producers keep committing while the transport is down
    produce(51, 300).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pending = e
        .count("SELECT COUNT(*) FROM custody_outbox WHERE status = 0")
        .await?;
    assert!(
        pending >= 250,
        "backlog should grow while NATS is down, pending = {pending}"
    );
    assert_eq!(
        e.count("SELECT COUNT(*) FROM custody_outbox WHERE status = 2")
            .await?,
        0,
        "an outage must not dead-letter"
    );

    server.restart().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while e
        .count("SELECT COUNT(*) FROM custody_outbox WHERE status = 0")
        .await?
        > 0
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "backlog did not drain after NATS came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cancel.cancel();
    relay.await??;

    let mut c = e.consumer(Recorder::default()).await?;
    e.consume_until(&mut c, 300, Duration::from_secs(30))
        .await?;
    let eff = e.effects().await?;
    let v = verdict(&eff);
    assert_eq!(
        (v.applied, v.distinct),
        (300, 300),
        "lost or doubled messages"
    );
    // per key the seq values are increasing (keys are i % 7, seq = i)
    assert_eq!(v.order_violations, 0);
    e.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn consumer_killed_between_handler_and_commit_applies_effect_once() -> anyhow::Result<()> {
    let Some(e) = env(None, "custody_e2e").await? else {
        return Ok(());
    };
    let msgs: Vec<Message> = (1..=10).map(|i| step_message("steps", "k", i)).collect();
    let mut tx = e.a.begin().await?;
    e.outbox.enqueue_batch(&mut tx, &msgs).await?;
    tx.commit().await?;
    let mut relay = Relay::new(
        e.outbox.clone(),
        NatsPublisher::new(e.client.clone(), &e.spec),
        Env::relay_config(),
    );
    drain(&mut relay, 10).await?;

    // the handler writes message 1's effect, then the consumer dies before commit
    let rec = Recorder::default();
    rec.hang_after_effect.store(true, Ordering::SeqCst);
    let reached = rec.reached.clone();
    let c = e.consumer(rec).await?;
    let task = tokio::spawn(c.run(CancellationToken::new()));
    tokio::time::timeout(Duration::from_secs(20), reached.notified()).await?;
    task.abort();
    let _ = task.await;
    assert!(
        e.effects().await?.is_empty(),
        "an uncommitted effect is visible"
    );

    // restart: everything applied once, in order
    let mut c = e.consumer(Recorder::default()).await?;
    e.consume_until(&mut c, 10, Duration::from_secs(20)).await?;
    let v = verdict(&e.effects().await?);
    assert_eq!((v.applied, v.distinct, v.order_violations), (10, 10, 0));
    e.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn malformed_payload_is_dead_lettered_and_later_messages_still_processed(
) -> anyhow::Result<()> {
    let Some(e) = env(None, "custody_e2e").await? else {
        return Ok(());
    };
    let bad = Message::builder("steps", "k", "Step")
        .payload(
            custody_core::CONTENT_TYPE_JSON,
            b"\x00\x01 not json".to_vec(),
        )
        .build()?;
    let unknown = Message::builder("steps", "k", "StepRenamed")
        .json(&serde_json::json!({"key": "k", "seq": 9}))?
        .build()?;
    let good = vec![step_message("steps", "k", 1), step_message("steps", "k", 2)];
    let mut tx = e.a.begin().await?;
    e.outbox.enqueue(&mut tx, &bad).await?;
    e.outbox.enqueue(&mut tx, &unknown).await?;
    e.outbox.enqueue_batch(&mut tx, &good).await?;
    tx.commit().await?;
    // and a message that is not a custody envelope at all, straight onto the subject
    let js = async_nats::jetstream::new(e.client.clone());
    js.publish(e.spec.subject("steps"), "raw bytes".into())
        .await?
        .await?;
    let mut relay = Relay::new(
        e.outbox.clone(),
        NatsPublisher::new(e.client.clone(), &e.spec),
        Env::relay_config(),
    );
    drain(&mut relay, 4).await?;

    let mut c = e.consumer(Recorder::default()).await?;
    e.consume_until(&mut c, 2, Duration::from_secs(20)).await?;
    while c.run_once().await? > 0 {}
    assert_eq!(e.effects().await?.len(), 2);
    let dead = custody_postgres::dead_letters(&e.b).await?;
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert!(dead
        .iter()
        .any(|d| d.message_id == Some(bad.id) && d.error.contains("cannot decode")));
    assert!(dead
        .iter()
        .any(|d| d.message_id == Some(unknown.id) && d.error.contains("unknown message type")));
    assert!(dead
        .iter()
        .any(|d| d.message_id.is_none() && d.error.contains("malformed")));
    e.cleanup().await;
    Ok(())
}
