//! Live gap detection on SQLite: numbering under the lease, skip markers,
//! the inbox floor, progress and compaction (custody_core::sequence).
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use common::{db, msg};
use custody_core::sequence::{advance_floor, is_skip_marker, SKIPPED_HEADER, SKIP_TYPE};
use custody_core::{
    partition_for, Compaction, DeadLetter, InboxOutcome, InboxStore, Message, MessageKind,
    OutboxRecord, OutboxStore, PartitionProgress, PublishAck, SentHistory, Sequence,
};
use custody_sqlite::{dead_letter_rows, SqliteInbox, SqliteOutbox};
use sqlx::SqlitePool;

const TTL: Duration = Duration::from_secs(10);
const PARTITIONS: u32 = 4;

fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

fn now_ms() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

/// Enqueue `n` messages over six keys (so several partitions) and two
/// topics, committed.
async fn enqueue(
    outbox: &SqliteOutbox,
    pool: &SqlitePool,
    from: u64,
    n: u64,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    for i in from..from + n {
        let topic = if i % 3 == 0 { "payments" } else { "orders" };
        outbox
            .enqueue(&mut tx, &msg(topic, &format!("k{}", i % 6), i))
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// `(partition, position, sequence)` of each record, in batch order.
fn numbering(records: &[OutboxRecord]) -> Vec<(u32, i64, Option<u64>)> {
    records
        .iter()
        .map(|r| (r.partition, r.position, r.sequence))
        .collect()
}

/// Every record numbered, and per (partition, topic) the numbers are
/// `first[..]`, `first[..] + 1`, … in position order.
fn assert_numbered_from(records: &[OutboxRecord], first: &BTreeMap<(u32, String), u64>) {
    let mut next = first.clone();
    let mut sorted: Vec<&OutboxRecord> = records.iter().collect();
    sorted.sort_by_key(|r| r.position);
    for r in sorted {
        let n = next
            .entry((r.partition, r.message.topic.clone()))
            .or_insert(1);
        assert_eq!(
            r.sequence,
            Some(*n),
            "position {} of partition {}",
            r.position,
            r.partition
        );
        *n += 1;
    }
}

#[tokio::test]
async fn producer_id_is_made_by_the_migration_and_stable() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let id = outbox
        .producer_id()
        .await?
        .expect("sqlite numbers messages");
    assert_eq!(id.len(), 32, "{id}");
    assert!(id
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(outbox.producer_id().await?, Some(id.clone()), "cached");
    // Another handle on the same database (a restarted relay): same id.
    custody_sqlite::migrate(&pool).await?;
    assert_eq!(
        SqliteOutbox::new(pool.clone()).producer_id().await?,
        Some(id.clone())
    );
    // Another database: another producer.
    let (_dir2, other) = db().await?;
    assert_ne!(SqliteOutbox::new(other).producer_id().await?, Some(id));
    Ok(())
}

#[tokio::test]
async fn sequences_are_per_partition_in_position_order_and_survive_a_handover() -> anyhow::Result<()>
{
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone()).with_partitions(PARTITIONS);
    let all: Vec<u32> = (0..PARTITIONS).collect();
    let t0 = now_ms();
    enqueue(&outbox, &pool, 0, 20).await?;
    assert_eq!(outbox.acquire_leases("a", TTL, t0).await?, all);

    let mut batch = outbox.fetch_batch(&all, 100, t0).await?;
    assert_eq!(batch.len(), 20);
    assert!(batch.iter().all(|r| r.sequence.is_none()));
    let order: Vec<i64> = batch.iter().map(|r| r.position).collect();
    outbox.assign_sequences("a", &mut batch, t0).await?;
    assert_eq!(
        batch.iter().map(|r| r.position).collect::<Vec<_>>(),
        order,
        "records keep their order"
    );
    assert_numbered_from(&batch, &BTreeMap::new());
    let parts: BTreeSet<u32> = batch.iter().map(|r| r.partition).collect();
    assert!(parts.len() > 1, "the keys spread over several partitions");
    let streams: BTreeSet<(u32, &str)> = batch
        .iter()
        .map(|r| (r.partition, r.message.topic.as_str()))
        .collect();
    assert!(
        streams.len() > parts.len(),
        "some partition has both topics, numbered apart"
    );

    // Stored: a second fetch (e.g. after a failed publish) has the numbers,
    // and numbering again changes nothing.
    let mut again = outbox.fetch_batch(&all, 100, t0).await?;
    assert_eq!(numbering(&again), numbering(&batch));
    outbox.assign_sequences("a", &mut again, t0).await?;
    assert_eq!(numbering(&again), numbering(&batch));

    // Publish the first half, enqueue more; relay a dies and b takes over
    // after the ttl: b's numbers continue where a's stopped.
    let acked: Vec<(i64, PublishAck)> = batch[..10]
        .iter()
        .map(|r| (r.position, PublishAck::default()))
        .collect();
    assert_eq!(outbox.mark_published("a", &acked, t0).await?, 10);
    let mut next: BTreeMap<(u32, String), u64> = BTreeMap::new();
    for r in &batch {
        let n = next
            .entry((r.partition, r.message.topic.clone()))
            .or_insert(1);
        *n = (*n).max(r.sequence.unwrap_or(0) + 1);
    }
    enqueue(&outbox, &pool, 20, 12).await?;
    let later = t0 + chrono::Duration::from_std(TTL)? + secs(1);
    assert_eq!(outbox.acquire_leases("b", TTL, later).await?, all);
    let mut batch_b = outbox.fetch_batch(&all, 100, later).await?;
    assert_eq!(
        batch_b.len(),
        22,
        "10 numbered by a, still pending, and 12 new"
    );
    let (old, new): (Vec<OutboxRecord>, Vec<OutboxRecord>) =
        batch_b.iter().cloned().partition(|r| r.sequence.is_some());
    assert_eq!(numbering(&old), numbering(&batch[10..]));
    assert_eq!(new.len(), 12);
    outbox.assign_sequences("b", &mut batch_b, later).await?;
    assert_eq!(batch_b.len(), 22);
    let new_numbered: Vec<OutboxRecord> = batch_b
        .iter()
        .filter(|r| new.iter().any(|n| n.position == r.position))
        .cloned()
        .collect();
    assert_numbered_from(&new_numbered, &next);
    // The old ones kept theirs.
    for r in &batch_b {
        if let Some(o) = old.iter().find(|o| o.position == r.position) {
            assert_eq!(r.sequence, o.sequence);
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_relay_without_the_lease_numbers_nothing() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone()).with_partitions(PARTITIONS);
    let all: Vec<u32> = (0..PARTITIONS).collect();
    let t0 = now_ms();
    enqueue(&outbox, &pool, 0, 8).await?;
    outbox.acquire_leases("a", TTL, t0).await?;
    let mut first = outbox.fetch_batch(&all, 100, t0).await?;
    outbox.assign_sequences("a", &mut first, t0).await?;
    assert_eq!(first.len(), 8);

    enqueue(&outbox, &pool, 8, 8).await?;
    let mut stale = outbox.fetch_batch(&all, 100, t0).await?;
    assert_eq!(stale.len(), 16);
    // b holds no lease: a's numbered records stay (they may be
    // republished), the unnumbered ones go and stay unnumbered.
    outbox.assign_sequences("b", &mut stale, t0).await?;
    assert_eq!(numbering(&stale), numbering(&first));
    // a's own lease, once expired, fences a the same way.
    let expired = t0 + chrono::Duration::from_std(TTL)? + secs(1);
    let mut late = outbox.fetch_batch(&all, 100, expired).await?;
    outbox.assign_sequences("a", &mut late, expired).await?;
    assert_eq!(numbering(&late), numbering(&first));

    let fresh = outbox.fetch_batch(&all, 100, t0).await?;
    assert_eq!(fresh.iter().filter(|r| r.sequence.is_none()).count(), 8);
    // No number was used up: a (renewed) continues without a hole.
    outbox.acquire_leases("a", TTL, t0 + secs(1)).await?;
    let mut batch = outbox.fetch_batch(&all, 100, t0 + secs(1)).await?;
    outbox
        .assign_sequences("a", &mut batch, t0 + secs(1))
        .await?;
    assert_eq!(batch.len(), 16);
    assert_numbered_from(&batch, &BTreeMap::new());
    Ok(())
}

#[tokio::test]
async fn dead_letter_of_a_numbered_row_leaves_a_skip_marker() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone()).with_partitions(PARTITIONS);
    let all: Vec<u32> = (0..PARTITIONS).collect();
    let t0 = now_ms();
    let m = msg("orders", "k1", 1);
    let mut tx = pool.begin().await?;
    let position = outbox.enqueue(&mut tx, &m).await?;
    tx.commit().await?;
    outbox.acquire_leases("a", TTL, t0).await?;
    let mut batch = outbox.fetch_batch(&all, 100, t0).await?;
    outbox.assign_sequences("a", &mut batch, t0).await?;
    assert_eq!(batch[0].sequence, Some(1));

    let _ = outbox
        .dead_letter("a", position, "broker rejects it: too large", t0)
        .await?;
    let batch = outbox.fetch_batch(&all, 100, t0).await?;
    assert_eq!(batch.len(), 1, "the marker, pending");
    let marker = &batch[0];
    assert!(marker.position > position);
    assert_eq!(marker.sequence, Some(1), "the original's number");
    assert_eq!(marker.partition, partition_for("k1", PARTITIONS));
    let mm = &marker.message;
    assert!(is_skip_marker(mm));
    assert_eq!(mm.message_type, SKIP_TYPE);
    assert_eq!(mm.kind, MessageKind::Event);
    assert_eq!((mm.topic.as_str(), mm.key.as_str()), ("orders", "k1"));
    assert_eq!(mm.content_type, "application/json");
    assert_ne!(mm.id, m.id);
    assert_eq!(mm.created_at, t0);
    assert_eq!(
        mm.headers.get(SKIPPED_HEADER).map(String::as_str),
        Some(m.id.to_string().as_str())
    );
    let body: serde_json::Value = serde_json::from_slice(&mm.payload)?;
    assert_eq!(
        body,
        serde_json::json!({"skipped": m.id.to_string(), "reason": "broker rejects it: too large"})
    );
    mm.validate()?;

    // A marker that is itself dead-lettered leaves none.
    let _ = outbox
        .dead_letter("a", marker.position, "still failing", t0)
        .await?;
    assert!(outbox.fetch_batch(&all, 100, t0).await?.is_empty());
    let dead = dead_letter_rows(&pool).await?;
    assert_eq!(dead.len(), 2);

    // Redriving the relay dead letter: pending again, without its old
    // number (the marker accounted for it); the relay gives it a new one.
    let original = dead
        .iter()
        .find(|(_, d)| d.message_id == Some(m.id))
        .map(|(seq, _)| *seq)
        .expect("original's dead letter");
    let out = custody_sqlite::redrive(&pool, &[original], t0).await?;
    assert_eq!(out.to_relay, 1);
    let mut batch = outbox.fetch_batch(&all, 100, t0).await?;
    assert_eq!(batch.len(), 1);
    assert_eq!((batch[0].message.id, batch[0].sequence), (m.id, None));
    outbox.assign_sequences("a", &mut batch, t0).await?;
    assert_eq!(batch[0].sequence, Some(2));

    // A repair republish keeps the number.
    let acked = [(batch[0].position, PublishAck::default())];
    assert_eq!(outbox.mark_published("a", &acked, t0).await?, 1);
    assert_eq!(outbox.republish(&[m.id]).await?, 1);
    let batch = outbox.fetch_batch(&all, 100, t0).await?;
    assert_eq!((batch[0].message.id, batch[0].sequence), (m.id, Some(2)));

    // An unnumbered row leaves no marker.
    let u = msg("orders", "k2", 2);
    let mut tx = pool.begin().await?;
    let pos_u = outbox.enqueue(&mut tx, &u).await?;
    tx.commit().await?;
    let _ = outbox.dead_letter("a", pos_u, "bad", t0).await?;
    let batch = outbox.fetch_batch(&all, 100, t0).await?;
    assert_eq!(batch.len(), 1, "only the republished original");
    assert_eq!(batch[0].message.id, m.id);
    Ok(())
}

const PRODUCER: &str = "p0";

fn numbered(partition: u32, seq: u64) -> Message {
    let mut m = msg("orders", &format!("k{partition}"), seq);
    Sequence {
        producer: PRODUCER.into(),
        topic: "orders".into(),
        partition,
        seq,
    }
    .stamp(&mut m);
    m
}

async fn record(
    inbox: &SqliteInbox,
    consumer: &str,
    m: &Message,
    now: DateTime<Utc>,
) -> anyhow::Result<InboxOutcome> {
    let mut tx = inbox.begin().await?;
    let out = inbox.record(&mut tx, consumer, m, now).await?;
    inbox.commit(tx).await?;
    Ok(out)
}

fn dead_letter_of(m: &Message, now: DateTime<Utc>) -> anyhow::Result<DeadLetter> {
    Ok(DeadLetter {
        message_id: Some(m.id),
        origin: String::new(),
        topic: m.topic.clone(),
        key: Some(m.key.clone()),
        message_type: Some(m.message_type.clone()),
        payload: m.payload.clone(),
        envelope: Some(serde_json::to_string(m)?),
        error: "permanent: no".into(),
        attempts: 1,
        dead_at: now,
    })
}

async fn inbox_count(pool: &SqlitePool, consumer: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM custody_inbox WHERE consumer = ?1")
            .bind(consumer)
            .fetch_one(pool)
            .await?,
    )
}

async fn progress_of(
    inbox: &SqliteInbox,
    consumer: &str,
    partition: u32,
) -> anyhow::Result<PartitionProgress> {
    inbox
        .progress(consumer)
        .await?
        .into_iter()
        .find(|p| p.producer == PRODUCER && p.topic == "orders" && p.partition == partition)
        .ok_or_else(|| anyhow::anyhow!("no progress for partition {partition}"))
}

#[tokio::test]
async fn a_numbered_duplicate_after_compaction_is_a_duplicate() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let inbox = SqliteInbox::new(pool.clone());
    let t0 = now_ms();
    let msgs: Vec<Message> = (1..=3).map(|s| numbered(0, s)).collect();
    for m in &msgs {
        assert_eq!(record(&inbox, "c", m, t0).await?, InboxOutcome::New);
    }
    // Other partitions and consumers are apart.
    assert_eq!(
        record(&inbox, "c", &numbered(1, 2), t0).await?,
        InboxOutcome::New
    );
    assert_eq!(record(&inbox, "d", &msgs[0], t0).await?, InboxOutcome::New);

    // Inside the keep window: the floor moves, the rows stay.
    let c = inbox.compact("c", t0, 100).await?;
    assert_eq!(
        c,
        Compaction {
            advanced: 1,
            deleted: 0
        }
    );
    assert_eq!(inbox_count(&pool, "c").await?, 4);
    let c = inbox.compact("c", t0 + secs(1), 2).await?;
    assert_eq!(
        c,
        Compaction {
            advanced: 0,
            deleted: 2
        },
        "limit 2"
    );
    let c = inbox.compact("c", t0 + secs(1), 100).await?;
    assert_eq!(
        c,
        Compaction {
            advanced: 0,
            deleted: 1
        }
    );
    assert_eq!(
        inbox_count(&pool, "c").await?,
        1,
        "partition 1's row (hole at 1)"
    );
    let p = progress_of(&inbox, "c", 0).await?;
    assert_eq!(
        (p.floor, p.high, p.holes, p.above_floor, p.compacted),
        (3, 3, 0, 0, 3)
    );
    let p1 = progress_of(&inbox, "c", 1).await?;
    assert_eq!(
        (p1.floor, p1.high, p1.holes, p1.first_hole),
        (0, 2, 1, Some(1))
    );
    assert_eq!(p1.gap_since, Some(t0));

    // The rows are gone; the floor still says "seen".
    assert_eq!(
        record(&inbox, "c", &msgs[1], t0 + secs(2)).await?,
        InboxOutcome::Duplicate
    );
    assert_eq!(inbox_count(&pool, "c").await?, 1, "no row left for it");
    // Another id with a number at or below the floor (e.g. the original
    // of a skip marker): a duplicate too.
    assert_eq!(
        record(&inbox, "c", &numbered(0, 2), t0).await?,
        InboxOutcome::Duplicate
    );
    assert_eq!(
        record(&inbox, "c", &numbered(0, 4), t0).await?,
        InboxOutcome::New
    );
    // "d" has no floor: its first sight of 2 is new.
    assert_eq!(record(&inbox, "d", &msgs[1], t0).await?, InboxOutcome::New);

    // Two ids sharing a number above the floor count once.
    let marker = numbered(0, 5);
    let original = numbered(0, 5);
    assert_eq!(record(&inbox, "c", &marker, t0).await?, InboxOutcome::New);
    assert_eq!(record(&inbox, "c", &original, t0).await?, InboxOutcome::New);
    let p = progress_of(&inbox, "c", 0).await?;
    assert_eq!((p.floor, p.high, p.above_floor, p.holes), (3, 5, 2, 0));
    inbox.compact("c", t0 + secs(10), 100).await?;
    assert_eq!(progress_of(&inbox, "c", 0).await?.floor, 5);
    Ok(())
}

#[tokio::test]
async fn a_dead_lettered_numbered_message_is_not_a_hole() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let inbox = SqliteInbox::new(pool.clone());
    let t0 = now_ms();
    let msgs: Vec<Message> = (1..=3).map(|s| numbered(2, s)).collect();
    assert_eq!(record(&inbox, "c", &msgs[0], t0).await?, InboxOutcome::New);
    assert_eq!(record(&inbox, "c", &msgs[2], t0).await?, InboxOutcome::New);
    // The handler fails for 2: its transaction rolls back, then it is
    // dead-lettered.
    let mut tx = inbox.begin().await?;
    assert_eq!(
        inbox.record(&mut tx, "c", &msgs[1], t0).await?,
        InboxOutcome::New
    );
    tx.rollback().await?;
    let p = progress_of(&inbox, "c", 2).await?;
    assert_eq!(
        (p.floor, p.high, p.holes),
        (0, 3, 1),
        "not yet accounted for"
    );
    inbox
        .dead_letter("c", &dead_letter_of(&msgs[1], t0)?)
        .await?;
    let p = progress_of(&inbox, "c", 2).await?;
    assert_eq!((p.floor, p.high, p.above_floor, p.holes), (0, 3, 3, 0));
    assert_eq!(inbox.compact("c", t0 + secs(1), 10).await?.advanced, 1);
    assert_eq!(progress_of(&inbox, "c", 2).await?.floor, 3);
    assert_eq!(
        record(&inbox, "c", &msgs[1], t0).await?,
        InboxOutcome::Duplicate
    );
    Ok(())
}

#[tokio::test]
async fn a_consumer_redrive_keeps_the_number_accounted_for() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let inbox = SqliteInbox::new(pool.clone());
    let t0 = now_ms();
    let msgs: Vec<Message> = (1..=3).map(|s| numbered(0, s)).collect();
    assert_eq!(record(&inbox, "c", &msgs[0], t0).await?, InboxOutcome::New);
    inbox
        .dead_letter("c", &dead_letter_of(&msgs[1], t0)?)
        .await?;
    assert_eq!(record(&inbox, "c", &msgs[2], t0).await?, InboxOutcome::New);
    let (seq, _) = dead_letter_rows(&pool).await?.remove(0);
    assert_eq!(
        custody_sqlite::redrive(&pool, &[seq], t0)
            .await?
            .to_consumer,
        1
    );
    assert_eq!(
        progress_of(&inbox, "c", 0).await?.holes,
        0,
        "number 2 still accounted for"
    );

    // The redriven message (unstamped, as the consumer engine hands it
    // over) is new exactly once.
    let redrives = inbox.redrives("c", 10).await?;
    assert_eq!(redrives.len(), 1);
    let mut again = redrives[0].message.clone();
    Sequence::unstamp(&mut again);
    // (as the engine does: the queue row taken first, in the same transaction)
    let mut tx = inbox.begin().await?;
    inbox.finish_redrive(&mut tx, redrives[0].seq).await?;
    assert_eq!(
        inbox.record(&mut tx, "c", &again, t0).await?,
        InboxOutcome::New
    );
    inbox.commit(tx).await?;
    assert_eq!(
        record(&inbox, "c", &again, t0).await?,
        InboxOutcome::Duplicate
    );
    assert_eq!(
        record(&inbox, "c", &msgs[1], t0).await?,
        InboxOutcome::Duplicate
    );
    assert_eq!(progress_of(&inbox, "c", 0).await?.holes, 0);

    // Stamped and after compaction moved the floor past it: a copy that is
    // not the redrive is a duplicate while the redrive is queued; the
    // redrive (its queue row taken in its transaction) is new once.
    inbox
        .dead_letter("c", &dead_letter_of(&msgs[2], t0)?)
        .await?;
    inbox.compact("c", t0, 10).await?; // floor 3, rows kept (keep window)
    let dead = dead_letter_rows(&pool).await?;
    let seqs: Vec<i64> = dead.iter().map(|(s, _)| *s).collect();
    custody_sqlite::redrive(&pool, &seqs, t0).await?;
    let redrives = inbox.redrives("c", 10).await?;
    assert_eq!(redrives.len(), 1);
    assert_eq!(
        record(&inbox, "c", &msgs[2], t0).await?,
        InboxOutcome::Duplicate
    );
    let mut again = redrives[0].message.clone();
    Sequence::unstamp(&mut again);
    let mut tx = inbox.begin().await?;
    inbox.finish_redrive(&mut tx, redrives[0].seq).await?;
    assert_eq!(
        inbox.record(&mut tx, "c", &again, t0).await?,
        InboxOutcome::New
    );
    inbox.commit(tx).await?;
    assert_eq!(
        record(&inbox, "c", &msgs[2], t0).await?,
        InboxOutcome::Duplicate
    );
    Ok(())
}

mod model {
    //! The real SqliteInbox against a model of what it must do.

    use super::*;
    use proptest::prelude::*;

    const NUMBERS: u64 = 12;
    const PARTS: u32 = 2;

    #[derive(Debug, Clone)]
    enum Op {
        /// Deliver (again) the message with this number.
        Deliver(u32, u64),
        /// Compact with this limit and keep window (seconds back from now).
        Compact(usize, i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0..PARTS, 1..=NUMBERS).prop_map(|(p, n)| Op::Deliver(p, n)),
            1 => (1usize..6, 0i64..12).prop_map(|(l, b)| Op::Compact(l, b)),
        ]
    }

    #[derive(Default)]
    struct Part {
        floor: u64,
        /// Numbers processed or dead-lettered.
        seen: BTreeSet<u64>,
        /// Inbox rows: number → processed_at (one id per number here).
        rows: BTreeMap<u64, i64>,
    }

    impl Part {
        fn prefix(&self) -> u64 {
            (1..)
                .take_while(|n| self.seen.contains(n))
                .last()
                .unwrap_or(0)
        }
        fn high(&self) -> u64 {
            self.seen
                .iter()
                .next_back()
                .copied()
                .unwrap_or(0)
                .max(self.floor)
        }
        fn holes(&self) -> u64 {
            (1..=self.high()).filter(|n| !self.seen.contains(n)).count() as u64
        }
    }

    async fn part_rows(pool: &SqlitePool, p: u32) -> anyhow::Result<usize> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM custody_inbox WHERE consumer = 'c' AND producer_partition = ?1",
        )
        .bind(i64::from(p))
        .fetch_one(pool)
        .await?;
        Ok(usize::try_from(n)?)
    }

    async fn run(ops: Vec<Op>, dead: Vec<bool>) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let pool = custody_sqlite::connect_with(
            &dir.path().join("m.db").to_string_lossy(),
            custody_sqlite::SqliteSettings {
                synchronous_full: false,
                ..Default::default()
            },
        )
        .await?;
        custody_sqlite::migrate(&pool).await?;
        let inbox = SqliteInbox::new(pool.clone());
        let msgs: BTreeMap<(u32, u64), Message> = (0..PARTS)
            .flat_map(|p| (1..=NUMBERS).map(move |n| (p, n)))
            .map(|(p, n)| ((p, n), numbered(p, n)))
            .collect();
        let dies = |p: u32, n: u64| dead[(p as usize) * NUMBERS as usize + n as usize - 1];
        let mut parts: BTreeMap<u32, Part> = (0..PARTS).map(|p| (p, Part::default())).collect();
        let mut delivered: BTreeSet<(u32, u64)> = BTreeSet::new();
        let t0 = now_ms();
        let final_op = Op::Compact(usize::MAX, -1_000_000);
        for (step, op) in ops.iter().chain([&final_op]).enumerate() {
            let now = t0 + secs(i64::try_from(step)?);
            let now_ms = now.timestamp_millis();
            match *op {
                Op::Deliver(p, n) => {
                    let m = &msgs[&(p, n)];
                    let first = delivered.insert((p, n));
                    let mut tx = inbox.begin().await?;
                    let got = inbox.record(&mut tx, "c", m, now).await?;
                    let want = if first {
                        InboxOutcome::New
                    } else {
                        InboxOutcome::Duplicate
                    };
                    anyhow::ensure!(got == want, "step {step}: {p}/{n}: {got:?}, want {want:?}");
                    let part = parts.get_mut(&p).expect("partition");
                    if first && dies(p, n) {
                        tx.rollback().await?;
                        inbox.dead_letter("c", &dead_letter_of(m, now)?).await?;
                    } else {
                        inbox.commit(tx).await?;
                    }
                    if first {
                        part.seen.insert(n);
                        part.rows.insert(n, now_ms);
                    }
                }
                Op::Compact(limit, back) => {
                    let keep_after = now - secs(back);
                    let keep_ms = keep_after.timestamp_millis();
                    let got = inbox.compact("c", keep_after, limit).await?;
                    let mut want = Compaction::default();
                    let mut complete = Vec::new();
                    for (p, part) in parts.iter_mut() {
                        if part.seen.is_empty() {
                            continue;
                        }
                        let above = part.seen.range(part.floor + 1..).copied().take(limit);
                        let floor = advance_floor(part.floor, above);
                        want.advanced += u64::from(floor > part.floor);
                        part.floor = floor;
                        let gone: Vec<u64> = part
                            .rows
                            .iter()
                            .filter(|(n, at)| **n <= floor && **at < keep_ms)
                            .map(|(n, _)| *n)
                            .take(limit)
                            .collect();
                        want.deleted += gone.len() as u64;
                        if gone.len() < limit {
                            complete.push((*p, keep_ms));
                        }
                        for n in gone {
                            part.rows.remove(&n);
                        }
                    }
                    anyhow::ensure!(
                        got == want,
                        "step {step}: compaction {got:?}, want {want:?}"
                    );
                    // Bound: whatever compaction could delete, it did.
                    for (p, keep_ms) in complete {
                        let part = &parts[&p];
                        let above = part.seen.range(part.floor + 1..).count();
                        let window = part.rows.values().filter(|at| **at >= keep_ms).count();
                        let rows = part_rows(&pool, p).await?;
                        anyhow::ensure!(
                            rows <= above + window,
                            "step {step}: partition {p}: {rows} rows > {above} above the floor + {window} in the window"
                        );
                    }
                }
            }
            let progress = inbox.progress("c").await?;
            let reported: Vec<u32> = progress.iter().map(|p| p.partition).collect();
            let expected: Vec<u32> = parts
                .iter()
                .filter(|(_, part)| !part.seen.is_empty())
                .map(|(p, _)| *p)
                .collect();
            anyhow::ensure!(reported == expected, "step {step}: partitions {reported:?}");
            for pr in &progress {
                let part = &parts[&pr.partition];
                let p = pr.partition;
                anyhow::ensure!(pr.producer == PRODUCER);
                anyhow::ensure!(
                    pr.floor == part.floor,
                    "step {step}: {p}: floor {} want {}",
                    pr.floor,
                    part.floor
                );
                anyhow::ensure!(
                    pr.floor <= part.prefix(),
                    "step {step}: {p}: floor past a hole"
                );
                anyhow::ensure!(
                    pr.high == part.high(),
                    "step {step}: {p}: high {} want {}",
                    pr.high,
                    part.high()
                );
                anyhow::ensure!(
                    pr.holes == part.holes(),
                    "step {step}: {p}: holes {} want {}",
                    pr.holes,
                    part.holes()
                );
                anyhow::ensure!(
                    pr.above_floor == part.seen.range(part.floor + 1..).count() as u64,
                    "step {step}: {p}: above_floor {}",
                    pr.above_floor
                );
                let rows = part_rows(&pool, p).await?;
                anyhow::ensure!(
                    rows == part.rows.len(),
                    "step {step}: {p}: {rows} rows, want {}",
                    part.rows.len()
                );
            }
        }
        // The last compaction (no limit, nothing kept): every floor is the
        // largest hole-free prefix and only rows above it remain.
        for (p, part) in &parts {
            anyhow::ensure!(part.floor == part.prefix(), "{p}: final floor");
            let rows = part_rows(&pool, *p).await?;
            anyhow::ensure!(
                rows == part.seen.range(part.floor + 1..).count(),
                "{p}: final rows {rows}"
            );
        }
        pool.close().await;
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Any arrival order, redeliveries, lost and dead-lettered
        /// messages, compactions with any limit and keep window: dedupe
        /// stays exact, progress is the truth, the inbox stays bounded.
        #[test]
        fn inbox_floor_progress_and_compaction_match_the_model(
            ops in proptest::collection::vec(op(), 0..80),
            dead in proptest::collection::vec(proptest::bool::weighted(0.2), (PARTS as usize) * NUMBERS as usize),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(run(ops, dead)).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        }
    }
}
