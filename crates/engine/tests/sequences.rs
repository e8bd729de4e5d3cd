//! Live gap detection on the real components (PostgreSQL outbox → relay →
//! NATS JetStream → consumer → PostgreSQL inbox): the relay numbers each
//! partition, the consumer's floors show a lost delivery as a gap the moment
//! a later number arrives, a repair closes it, compaction folds the inbox
//! into the floors without losing dedupe, and a message the relay
//! dead-letters never reads as a gap.

mod common;

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{env, step_message, Env, Recorder};
use custody_core::{Error, Message, PartitionProgress, PublishAck, Publisher, SentHistory};
use custody_engine::live::reconcile_live;
use custody_engine::{Consumer, ConsumerConfig, Relay, RelayConfig};
use custody_nats::{NatsPublisher, NatsSubscriber};
use custody_postgres::{PgInbox, PgOutbox};
use uuid::Uuid;

impl Env {
    fn relay<P: Publisher>(&self, publisher: P) -> Relay<PgOutbox, P> {
        let cfg = RelayConfig {
            poll_interval: Duration::from_millis(50),
            lease_ttl: Duration::from_secs(5),
            max_attempts: 2,
            ..RelayConfig::default()
        };
        Relay::new(self.outbox.clone(), publisher, cfg).with_id("relay-1")
    }

    fn nats(&self) -> NatsPublisher {
        NatsPublisher::new(self.client.clone(), &self.spec)
    }

    async fn consumer(&self) -> anyhow::Result<Consumer<PgInbox, NatsSubscriber, Recorder>> {
        let sub = self.billing_subscriber().await?;
        let mut cfg = ConsumerConfig::new("billing");
        cfg.fetch_wait = Duration::from_millis(200);
        // fold everything at once (no reconciliation window kept)
        cfg.compact_keep = Duration::ZERO;
        cfg.watermark_interval = Duration::from_secs(3600);
        Ok(Consumer::new(
            PgInbox::new(self.b.clone()),
            sub,
            Recorder::default(),
            cfg,
        ))
    }

    async fn enqueue(&self, msgs: &[Message]) -> anyhow::Result<()> {
        let mut tx = self.a.begin().await?;
        self.outbox.enqueue_batch(&mut tx, msgs).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn effects(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM effects")
            .fetch_one(&self.b)
            .await?)
    }

    async fn numbered_inbox_rows(&self) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM custody_inbox WHERE seq IS NOT NULL")
                .fetch_one(&self.b)
                .await?,
        )
    }
}

/// Step the relay until `published` reaches `n` (30 s at most).
async fn drain<P: Publisher>(relay: &mut Relay<PgOutbox, P>, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.stats().published + relay.stats().dead_lettered < n && Instant::now() < deadline {
        if relay.step().await? == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Run the consumer until `done` holds (30 s at most).
async fn consume_until<F>(
    c: &mut Consumer<PgInbox, NatsSubscriber, Recorder>,
    mut done: F,
) -> anyhow::Result<()>
where
    F: FnMut(&custody_engine::ConsumerStats) -> bool,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(c.stats()) && Instant::now() < deadline {
        c.run_once().await?;
    }
    Ok(())
}

/// Acks without publishing the messages whose ids are in `lose`: a broker
/// that loses data after acknowledging it.
struct Losing {
    inner: NatsPublisher,
    lose: Mutex<HashSet<Uuid>>,
}

impl Publisher for Losing {
    async fn publish(&self, message: &Message) -> custody_core::Result<PublishAck> {
        if self.lose.lock().expect("lock").remove(&message.id) {
            return Ok(PublishAck::default());
        }
        self.inner.publish(message).await
    }
}

/// Refuses the messages whose ids are in `refuse` for good (a terminal
/// transport error, as for an oversized message).
struct Refusing {
    inner: NatsPublisher,
    refuse: HashSet<Uuid>,
}

impl Publisher for Refusing {
    async fn publish(&self, message: &Message) -> custody_core::Result<PublishAck> {
        if self.refuse.contains(&message.id) {
            return Err(Error::InvalidMessage(
                "refused by the test transport".into(),
            ));
        }
        self.inner.publish(message).await
    }
}

fn total(progress: &[PartitionProgress], f: impl Fn(&PartitionProgress) -> u64) -> u64 {
    progress.iter().map(f).sum()
}

#[tokio::test]
async fn a_lost_delivery_is_a_gap_until_repaired_then_compaction_keeps_dedupe() -> anyhow::Result<()>
{
    let Some(e) = env(None, "custody_seq").await? else {
        return Ok(());
    };
    // 3 keys x 10 messages; one message of key b lost by the "broker"
    let msgs: Vec<Message> = (1..=10)
        .flat_map(|i| ["a", "b", "c"].map(|k| step_message("steps", k, i)))
        .collect();
    e.enqueue(&msgs).await?;
    let lost = msgs
        .iter()
        .find(|m| m.key == "b")
        .map(|m| m.id)
        .unwrap_or_default();
    // and the very last message: nothing numbered after it ever arrives
    let lost_tail = msgs.last().map(|m| m.id).unwrap_or_default();
    let losing = Losing {
        inner: e.nats(),
        lose: Mutex::new(HashSet::from([lost, lost_tail])),
    };
    let mut relay = e.relay(losing);
    drain(&mut relay, 30).await?;
    assert_eq!(relay.stats().published, 30);

    // every row was numbered 1..n within its partition and topic
    let bad: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT partition FROM custody_outbox GROUP BY partition, topic
         HAVING COUNT(*) <> COUNT(DISTINCT seq) OR MIN(seq) <> 1 OR MAX(seq) <> COUNT(*)) x",
    )
    .fetch_one(&e.a)
    .await?;
    assert_eq!(bad, 0, "each partition numbered 1..n without repeats");

    let mut c = e.consumer().await?;
    consume_until(&mut c, |s| s.processed >= 28).await?;
    assert_eq!(c.stats().processed, 28);

    // the live check names both: the hole, and (with the producer) the tail
    let inbox = PgInbox::new(e.b.clone());
    let young = reconcile_live(
        Some(&e.outbox),
        &inbox,
        "billing",
        Duration::from_secs(3600),
        chrono::Utc::now(),
    )
    .await?;
    assert!(
        young.is_clean(),
        "younger than the grace: in flight {young:?}"
    );
    assert_eq!(young.in_flight, 2);
    let report = reconcile_live(
        Some(&e.outbox),
        &inbox,
        "billing",
        Duration::ZERO,
        chrono::Utc::now(),
    )
    .await?;
    let found: HashSet<(Uuid, String)> = report
        .missing
        .iter()
        .map(|m| (m.id.unwrap_or_default(), m.kind.clone()))
        .collect();
    assert_eq!(
        found,
        HashSet::from([(lost, "hole".to_owned()), (lost_tail, "tail".to_owned())]),
        "{report:?}"
    );
    // without the producer only the hole is visible, by number
    let alone = reconcile_live(
        None::<&PgOutbox>,
        &inbox,
        "billing",
        Duration::ZERO,
        chrono::Utc::now(),
    )
    .await?;
    assert_eq!(alone.missing.len(), 1, "{alone:?}");
    assert_eq!(
        (alone.missing[0].kind.as_str(), alone.missing[0].id),
        ("hole", None)
    );
    // repair the tail; the hole is checked and repaired below
    assert_eq!(e.outbox.republish(&[lost_tail]).await?, 1);
    let mut relay = e.relay(e.nats());
    drain(&mut relay, 1).await?;
    consume_until(&mut c, |s| s.processed >= 29).await?;
    assert_eq!(c.stats().processed, 29);
    let progress = c.watermarks(chrono::Utc::now()).await?;
    assert_eq!(total(&progress, |p| p.holes), 1, "{progress:?}");
    let gap = progress
        .iter()
        .find(|p| p.holes > 0)
        .cloned()
        .expect("a partition with a hole");
    let lost_seq: i64 = sqlx::query_scalar("SELECT seq FROM custody_outbox WHERE id = $1")
        .bind(lost)
        .fetch_one(&e.a)
        .await?;
    assert_eq!(gap.first_hole, Some(u64::try_from(lost_seq)?));
    // `custody trace` / status(id) shows the number
    let st = custody_postgres::status(&e.a, lost).await?;
    assert_eq!(
        st.producer.and_then(|p| p.sequence),
        Some(u64::try_from(lost_seq)?)
    );
    assert!(gap.gap_since.is_some());
    // the floor stopped below the hole: the rows above it are kept, even by
    // retention (deleting them would open false gaps)
    assert!(e.numbered_inbox_rows().await? > 0);
    let far = chrono::Utc::now() + chrono::Duration::days(1);
    custody_core::InboxStore::prune(&PgInbox::new(e.b.clone()), "billing", far, 10_000).await?;
    let after_prune = c.watermarks(chrono::Utc::now()).await?;
    assert_eq!(total(&after_prune, |p| p.holes), 1, "{after_prune:?}");

    // repair: back to pending (same number), published again, processed
    assert_eq!(e.outbox.republish(&[lost]).await?, 1);
    let mut relay = e.relay(e.nats());
    drain(&mut relay, 1).await?;
    consume_until(&mut c, |s| s.processed >= 30).await?;
    let clean = reconcile_live(
        Some(&e.outbox),
        &inbox,
        "billing",
        Duration::ZERO,
        chrono::Utc::now(),
    )
    .await?;
    assert!(clean.is_clean(), "{clean:?}");
    assert_eq!(e.effects().await?, 30);
    let progress = c.watermarks(chrono::Utc::now()).await?;
    assert_eq!(total(&progress, |p| p.holes), 0, "{progress:?}");
    // every number is below a floor and every numbered row folded into it
    assert_eq!(total(&progress, |p| p.floor), 30, "{progress:?}");
    assert_eq!(e.numbered_inbox_rows().await?, 0);
    assert!(c.stats().compacted >= 30);

    // dedupe still exact: a compacted message delivered again is skipped
    let again = msgs[4].id;
    assert_eq!(e.outbox.republish(&[again]).await?, 1);
    let mut relay = e.relay(e.nats());
    drain(&mut relay, 1).await?;
    let dups = c.stats().duplicates;
    consume_until(&mut c, |s| s.duplicates > dups).await?;
    assert_eq!(c.stats().duplicates, dups + 1);
    assert_eq!(e.effects().await?, 30, "no second effect");
    Ok(())
}

#[tokio::test]
async fn a_relay_dead_letter_is_accounted_for_and_its_redrive_gets_a_new_number(
) -> anyhow::Result<()> {
    let Some(e) = env(None, "custody_seq").await? else {
        return Ok(());
    };
    let msgs: Vec<Message> = (1..=8).map(|i| step_message("steps", "k", i)).collect();
    e.enqueue(&msgs).await?;
    let refused = msgs[3].id;
    let refusing = Refusing {
        inner: e.nats(),
        refuse: HashSet::from([refused]),
    };
    let mut relay = e.relay(refusing);
    // 7 published + 1 dead-lettered, then the skip marker is published too
    drain(&mut relay, 9).await?;
    assert_eq!(relay.stats().dead_lettered, 1);
    assert_eq!(relay.stats().published, 8, "7 messages and the marker");

    let mut c = e.consumer().await?;
    consume_until(&mut c, |s| s.processed + s.skipped >= 8).await?;
    assert_eq!((c.stats().processed, c.stats().skipped), (7, 1));
    assert_eq!(e.effects().await?, 7, "no handler ran for the marker");
    let progress = c.watermarks(chrono::Utc::now()).await?;
    assert_eq!(total(&progress, |p| p.holes), 0, "{progress:?}");
    assert_eq!(total(&progress, |p| p.floor), 8, "{progress:?}");

    // the operator fixes the cause and redrives it: a new number, processed once
    let seq: i64 = sqlx::query_scalar("SELECT seq FROM custody_dead_letter WHERE message_id = $1")
        .bind(refused)
        .fetch_one(&e.a)
        .await?;
    let out = custody_postgres::redrive(&e.a, &[seq], chrono::Utc::now()).await?;
    assert_eq!(out.to_relay, 1, "{out:?}");
    let mut relay = e.relay(e.nats());
    drain(&mut relay, 1).await?;
    let new_seq: i64 = sqlx::query_scalar("SELECT seq FROM custody_outbox WHERE id = $1")
        .bind(refused)
        .fetch_one(&e.a)
        .await?;
    assert_eq!(new_seq, 9);
    consume_until(&mut c, |s| s.processed >= 8).await?;
    assert_eq!(e.effects().await?, 8);
    let progress = c.watermarks(chrono::Utc::now()).await?;
    assert_eq!(total(&progress, |p| p.holes), 0, "{progress:?}");
    assert_eq!(total(&progress, |p| p.floor), 9, "{progress:?}");
    Ok(())
}

#[tokio::test]
async fn a_consumer_of_one_topic_sees_no_gaps_from_the_producers_other_topics() -> anyhow::Result<()>
{
    let Some(e) = env(None, "custody_seq").await? else {
        return Ok(());
    };
    // same keys (so same partitions) on two topics; the consumer takes one
    let msgs: Vec<Message> = (1..=10)
        .flat_map(|i| [step_message("steps", "k", i), step_message("other", "k", i)])
        .collect();
    e.enqueue(&msgs).await?;
    let mut relay = e.relay(e.nats());
    drain(&mut relay, 20).await?;
    let mut c = e.consumer().await?;
    consume_until(&mut c, |s| s.processed >= 10).await?;
    let progress = c.watermarks(chrono::Utc::now()).await?;
    assert_eq!(progress.len(), 1, "one topic, one partition: {progress:?}");
    assert_eq!(progress[0].topic, "steps");
    assert_eq!(
        (progress[0].floor, progress[0].holes),
        (10, 0),
        "{progress:?}"
    );
    Ok(())
}
