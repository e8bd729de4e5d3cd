//! `reconcile --live` on SQLite files: the producer's numbering read back
//! (`SentHistory::sequence_heads`, `numbered`), the consumer's numbers above
//! its floors (`ProcessedHistory::numbers_above_floor`), the live engine
//! (`custody_engine::live::reconcile_live`) over both, and inbox retention
//! that keeps the rows a gap check needs.
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use common::{db, msg};
use custody_core::{
    partition_for, InboxOutcome, InboxStore, Message, NumberedRow, OutboxRecord, OutboxStore,
    PartitionProgress, ProcessedHistory, PublishAck, SentHistory, Sequence, SequenceHead,
};
use custody_engine::live::{reconcile_live, LiveReport};
use custody_sqlite::{SqliteInbox, SqliteOutbox};
use sqlx::SqlitePool;
use uuid::Uuid;

const PARTITIONS: u32 = 4;
const RELAY: &str = "r";
const CONSUMER: &str = "billing";
const TTL: Duration = Duration::from_secs(600);
const GRACE: Duration = Duration::from_secs(60);

fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

fn now_ms() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

/// The first `n` keys `k0`, `k1`, … that fall in `partition`.
fn keys_in(partition: u32, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("k{i}"))
        .filter(|k| partition_for(k, PARTITIONS) == partition)
        .take(n)
        .collect()
}

/// What the relay does with a batch: fetch under the lease, number, stamp
/// (crates/engine/src/relay.rs `number`). Returns the stamped records.
async fn number_pending(
    outbox: &SqliteOutbox,
    at: DateTime<Utc>,
) -> anyhow::Result<Vec<OutboxRecord>> {
    let all: Vec<u32> = (0..PARTITIONS).collect();
    outbox.acquire_leases(RELAY, TTL, at).await?;
    let mut batch = outbox.fetch_batch(&all, 1000, at).await?;
    outbox.assign_sequences(RELAY, &mut batch, at).await?;
    let producer = outbox
        .producer_id()
        .await?
        .ok_or_else(|| anyhow::anyhow!("sqlite outboxes number messages"))?;
    for r in &mut batch {
        let seq = r
            .sequence
            .ok_or_else(|| anyhow::anyhow!("position {} not numbered", r.position))?;
        Sequence {
            producer: producer.clone(),
            topic: r.message.topic.clone(),
            partition: r.partition,
            seq,
        }
        .stamp(&mut r.message);
    }
    Ok(batch)
}

async fn enqueue(outbox: &SqliteOutbox, pool: &SqlitePool, msgs: &[Message]) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    outbox.enqueue_batch(&mut tx, msgs).await?;
    tx.commit().await?;
    Ok(())
}

async fn publish(
    outbox: &SqliteOutbox,
    recs: &[&OutboxRecord],
    at: DateTime<Utc>,
) -> anyhow::Result<()> {
    let acked: Vec<(i64, PublishAck)> = recs
        .iter()
        .map(|r| (r.position, PublishAck::default()))
        .collect();
    let n = outbox.mark_published(RELAY, &acked, at).await?;
    assert_eq!(n as usize, recs.len(), "all marked published");
    Ok(())
}

async fn record(
    inbox: &SqliteInbox,
    m: &Message,
    at: DateTime<Utc>,
) -> anyhow::Result<InboxOutcome> {
    let mut tx = inbox.begin().await?;
    let out = inbox.record(&mut tx, CONSUMER, m, at).await?;
    inbox.commit(tx).await?;
    Ok(out)
}

/// The record of `topic`'s number `seq` in `partition`.
fn rec<'a>(batch: &'a [OutboxRecord], topic: &str, partition: u32, seq: u64) -> &'a OutboxRecord {
    batch
        .iter()
        .find(|r| r.message.topic == topic && r.partition == partition && r.sequence == Some(seq))
        .unwrap_or_else(|| panic!("no {topic}/{partition} #{seq}"))
}

/// `(kind, topic, partition, seq, id, outbox status)` of each missing number.
type Missing = (String, String, u32, u64, Option<Uuid>, Option<String>);

fn missing_of(r: &LiveReport) -> BTreeSet<Missing> {
    r.missing
        .iter()
        .map(|m| {
            (
                m.kind.clone(),
                m.topic.clone(),
                m.partition,
                m.seq,
                m.id,
                m.outbox_status.clone(),
            )
        })
        .collect()
}

fn lost_as(kind: &str, r: &OutboxRecord, status: Option<&str>, with_id: bool) -> Missing {
    (
        kind.to_owned(),
        r.message.topic.clone(),
        r.partition,
        r.sequence.unwrap_or(0),
        with_id.then_some(r.message.id),
        status.map(str::to_owned),
    )
}

/// Three partitions of "orders" (x: a hole and a lost last number; y: two
/// lost last numbers and a pending one behind them; z: every number lost,
/// the consumer never saw the partition) and "payments" in x, whose hole is
/// younger than the grace. The check reports exactly the lost ones, each
/// resolved to its message, and is clean once they are recorded.
#[tokio::test]
async fn live_check_reports_exactly_the_lost_numbers_as_holes_and_tails() -> anyhow::Result<()> {
    let (_a_dir, a) = db().await?;
    let (_b_dir, b) = db().await?;
    let outbox = SqliteOutbox::new(a.clone()).with_partitions(PARTITIONS);
    let inbox = SqliteInbox::new(b.clone());
    let (x, y, z) = (0, 1, 2);
    let t0 = now_ms();
    let now = t0 + secs(600);

    // Nothing numbered yet: a producer with no heads, a consumer with no progress.
    let (producer, heads) = outbox
        .sequence_heads()
        .await?
        .ok_or_else(|| anyhow::anyhow!("sqlite outboxes number messages"))?;
    assert_eq!(Some(producer.clone()), outbox.producer_id().await?);
    assert!(heads.is_empty());
    let empty = reconcile_live(Some(&outbox), &inbox, CONSUMER, GRACE, now).await?;
    assert!(empty.is_clean() && empty.partitions.is_empty(), "{empty:?}");

    let mut msgs = Vec::new();
    for (p, n) in [(x, 5), (y, 4), (z, 3)] {
        let keys = keys_in(p, 2);
        msgs.extend((0..n).map(|i| msg("orders", &keys[i % 2], i as u64)));
    }
    let pay_key = &keys_in(x, 1)[0];
    msgs.extend((0..2).map(|i| msg("payments", pay_key, i)));
    enqueue(&outbox, &a, &msgs).await?;
    let batch = number_pending(&outbox, t0).await?;
    assert_eq!(batch.len(), msgs.len());
    publish(&outbox, &batch.iter().collect::<Vec<_>>(), t0).await?;

    // One more in y, numbered and still pending (the relay's backlog).
    enqueue(&outbox, &a, &[msg("orders", &keys_in(y, 1)[0], 99)]).await?;
    let backlog = number_pending(&outbox, t0).await?;
    assert_eq!(backlog.len(), 1);
    let pending = &backlog[0];
    assert_eq!((pending.partition, pending.sequence), (y, Some(5)));

    // The producer's heads, sorted by topic and partition.
    let (_, heads) = outbox.sequence_heads().await?.unwrap_or_default();
    let head = |topic: &str, partition, last| SequenceHead {
        topic: topic.into(),
        partition,
        last,
    };
    assert_eq!(
        heads,
        vec![
            head("orders", x, 5),
            head("orders", y, 5),
            head("orders", z, 3),
            head("payments", x, 2),
        ]
    );

    // Lost: orders x #2 (hole) and #5 (tail), y #3 #4 (tail; #5 pending),
    // z everything (tail), payments x #1 (a hole younger than the grace).
    let lost: Vec<&OutboxRecord> = vec![
        rec(&batch, "orders", x, 2),
        rec(&batch, "orders", x, 5),
        rec(&batch, "orders", y, 3),
        rec(&batch, "orders", y, 4),
        rec(&batch, "orders", z, 1),
        rec(&batch, "orders", z, 2),
        rec(&batch, "orders", z, 3),
        rec(&batch, "payments", x, 1),
    ];
    let lost_ids: BTreeSet<Uuid> = lost.iter().map(|r| r.message.id).collect();
    let young = rec(&batch, "payments", x, 2);
    for r in batch.iter().filter(|r| !lost_ids.contains(&r.message.id)) {
        let at = if r.message.id == young.message.id {
            now - secs(10)
        } else {
            t0
        };
        assert_eq!(record(&inbox, &r.message, at).await?, InboxOutcome::New);
    }

    // The producer's rows by number: both statuses, in number order.
    let rows = outbox.numbered("orders", y, &[5, 3, 4, 9]).await?;
    let row = |r: &OutboxRecord, status: &str, published_at| NumberedRow {
        seq: r.sequence.unwrap_or(0),
        id: r.message.id,
        status: status.into(),
        published_at,
    };
    assert_eq!(
        rows,
        vec![
            row(rec(&batch, "orders", y, 3), "published", Some(t0)),
            row(rec(&batch, "orders", y, 4), "published", Some(t0)),
            row(pending, "pending", None),
        ]
    );
    assert!(outbox.numbered("orders", y, &[]).await?.is_empty());
    assert!(outbox.numbered("payments", y, &[1]).await?.is_empty());

    // The consumer's numbers above the floor, with when each was recorded.
    let progress = inbox.sequence_progress(CONSUMER).await?;
    assert_eq!(progress, inbox.progress(CONSUMER).await?);
    let px: &PartitionProgress = progress
        .iter()
        .find(|p| p.topic == "orders" && p.partition == x)
        .ok_or_else(|| anyhow::anyhow!("no progress for orders/{x}"))?;
    assert_eq!((px.floor, px.high, px.holes), (0, 4, 1));
    assert_eq!(
        inbox.numbers_above_floor(CONSUMER, px, 100).await?,
        vec![(1, t0), (3, t0), (4, t0)]
    );
    assert_eq!(
        inbox.numbers_above_floor(CONSUMER, px, 2).await?,
        vec![(1, t0), (3, t0)]
    );

    let report = reconcile_live(Some(&outbox), &inbox, CONSUMER, GRACE, now).await?;
    let published = Some("published");
    let want: BTreeSet<Missing> = [
        lost_as("hole", lost[0], published, true),
        lost_as("tail", lost[1], published, true),
        lost_as("tail", lost[2], published, true),
        lost_as("tail", lost[3], published, true),
        lost_as("tail", lost[4], published, true),
        lost_as("tail", lost[5], published, true),
        lost_as("tail", lost[6], published, true),
    ]
    .into();
    assert_eq!(missing_of(&report), want, "{report:#?}");
    assert_eq!(report.missing.len(), want.len(), "each number once");
    assert_eq!(report.producer.as_deref(), Some(producer.as_str()));
    assert_eq!(
        report.in_flight, 2,
        "the young payments hole and y's pending #5: {report:#?}"
    );
    let republish: BTreeSet<Uuid> = report.republishable().into_iter().collect();
    let expected: BTreeSet<Uuid> = lost[..7].iter().map(|r| r.message.id).collect();
    assert_eq!(republish, expected);
    // Every partition of the consumer's topics, z included, with its head.
    let seen: BTreeSet<(String, u32, Option<u64>, u64)> = report
        .partitions
        .iter()
        .map(|p| {
            (
                p.progress.topic.clone(),
                p.progress.partition,
                p.producer_head,
                p.behind,
            )
        })
        .collect();
    let o = |t: &str, p, h, b| (t.to_owned(), p, Some(h), b);
    assert_eq!(
        seen,
        [
            o("orders", x, 5, 1),
            o("orders", y, 5, 3),
            o("orders", z, 3, 3),
            o("payments", x, 2, 0),
        ]
        .into()
    );

    // No number is reported before its grace has passed: with a grace
    // longer than every age, nothing is missing, everything is in flight.
    let patient = reconcile_live(
        Some(&outbox),
        &inbox,
        CONSUMER,
        Duration::from_secs(3600),
        now,
    )
    .await?;
    assert!(patient.is_clean(), "{patient:#?}");
    assert_eq!(patient.in_flight, 9);
    // Right at the age of the old records, not yet either (strictly older).
    let edge = reconcile_live(
        Some(&outbox),
        &inbox,
        CONSUMER,
        Duration::from_secs(600),
        now,
    )
    .await?;
    assert!(edge.is_clean(), "{edge:#?}");

    // Without the producer: the holes only, by number.
    let blind = reconcile_live(None::<&SqliteOutbox>, &inbox, CONSUMER, GRACE, now).await?;
    assert_eq!(
        missing_of(&blind),
        [lost_as("hole", lost[0], None, false)].into(),
        "{blind:#?}"
    );
    assert_eq!(blind.producer, None);

    // The lost ones arrive (a redelivery, a republish): clean, also after
    // compaction folds everything into the floors.
    for r in &lost {
        assert_eq!(record(&inbox, &r.message, now).await?, InboxOutcome::New);
    }
    let clean = reconcile_live(Some(&outbox), &inbox, CONSUMER, GRACE, now).await?;
    assert!(clean.is_clean(), "{clean:#?}");
    assert_eq!(clean.in_flight, 1, "y's pending #5");
    inbox.compact(CONSUMER, now + secs(1), 1000).await?;
    let compacted = reconcile_live(Some(&outbox), &inbox, CONSUMER, GRACE, now).await?;
    assert!(compacted.is_clean(), "{compacted:#?}");
    assert!(
        compacted.partitions.iter().all(|p| p.progress.holes == 0
            && p.progress.floor == p.progress.high
            && p.progress.above_floor == 0),
        "{compacted:#?}"
    );
    Ok(())
}

/// Retention never deletes the numbered rows a gap check reads: a row above
/// its partition's floor stays however old (with no watermark row the
/// floor is 0), while unnumbered rows and numbered ones at or below the
/// floor go as before.
#[tokio::test]
async fn inbox_prune_keeps_numbered_rows_above_the_floor() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let inbox = SqliteInbox::new(pool.clone());
    let t0 = now_ms();
    let old = t0 - secs(7200);
    let cutoff = t0 - secs(3600);
    let stamped = |topic: &str, partition: u32, seq: u64| {
        let mut m = msg(topic, "k", seq);
        Sequence {
            producer: "p".into(),
            topic: topic.into(),
            partition,
            seq,
        }
        .stamp(&mut m);
        m
    };
    // orders/0: 1, 2, 4 old and 5 new, compacted to floor 2 with the rows
    // kept (keep window in the past): 1 and 2 may go, 4 must stay.
    for (seq, at) in [(1, old), (2, old), (4, old), (5, t0)] {
        record(&inbox, &stamped("orders", 0, seq), at).await?;
    }
    let c = inbox.compact(CONSUMER, old - secs(1), 100).await?;
    assert_eq!((c.advanced, c.deleted), (1, 0));
    // orders/1: never compacted (no watermark row): 2 and 3 old, 4 new;
    // number 1 not arrived yet. Deleting 2 and 3 would hide that they came.
    for (seq, at) in [(2, old), (3, old), (4, t0)] {
        record(&inbox, &stamped("orders", 1, seq), at).await?;
    }
    // Unnumbered rows: the old one goes, the new one stays.
    let plain_old = msg("orders", "plain", 1);
    let plain_new = msg("orders", "plain", 2);
    record(&inbox, &plain_old, old).await?;
    record(&inbox, &plain_new, t0).await?;

    let before = inbox.progress(CONSUMER).await?;
    let summary = |ps: &[PartitionProgress]| -> Vec<(u32, u64, u64, u64)> {
        ps.iter()
            .map(|p| (p.partition, p.floor, p.high, p.holes))
            .collect()
    };
    assert_eq!(summary(&before), vec![(0, 2, 5, 1), (1, 0, 4, 1)]);

    // Limit 1 per statement: the kept rows do not use up the limit.
    let mut pruned = 0;
    loop {
        let n = inbox.prune(CONSUMER, cutoff, 1).await?;
        if n == 0 {
            break;
        }
        pruned += n;
    }
    assert_eq!(pruned, 3, "orders/0 #1 and #2, and the old unnumbered row");
    let rows: Vec<(Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT producer_partition, seq FROM custody_inbox WHERE consumer = ?1 \
         ORDER BY producer_partition, seq",
    )
    .bind(CONSUMER)
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        rows,
        vec![
            (None, None),
            (Some(0), Some(4)),
            (Some(0), Some(5)),
            (Some(1), Some(2)),
            (Some(1), Some(3)),
            (Some(1), Some(4)),
        ]
    );
    // The gaps are what they were: no false hole opened, none hidden.
    assert_eq!(summary(&inbox.progress(CONSUMER).await?), summary(&before));
    let report = reconcile_live(None::<&SqliteOutbox>, &inbox, CONSUMER, GRACE, t0).await?;
    let holes: Vec<(u32, u64)> = report
        .missing
        .iter()
        .map(|m| (m.partition, m.seq))
        .collect();
    assert_eq!(holes, vec![(0, 3), (1, 1)]);

    // Once the gaps close, compaction folds the rows and retention has
    // nothing numbered left to keep.
    record(&inbox, &stamped("orders", 0, 3), t0).await?;
    record(&inbox, &stamped("orders", 1, 1), t0).await?;
    inbox.compact(CONSUMER, old - secs(1), 100).await?;
    assert_eq!(inbox.prune(CONSUMER, t0 + secs(1), 100).await?, 8);
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM custody_inbox")
        .fetch_one(&pool)
        .await?;
    assert_eq!(left, 0);
    assert_eq!(
        summary(&inbox.progress(CONSUMER).await?),
        vec![(0, 5, 5, 0), (1, 4, 4, 0)]
    );
    Ok(())
}

/// Issue 11, scenario 5: one forged `custodyseq = 2^62` must not spin the
/// live check. The hole walk goes over what is stored (two rows here), not
/// over the number line: it lists the first `LIST_LIMIT` missing numbers and
/// counts the rest. Run on a thread of its own with a generous watchdog: a
/// walk over 2^62 numbers never yields to the runtime, so only another
/// thread can tell it spins (the old code did).
#[test]
fn a_forged_huge_number_does_not_spin_the_live_check() -> anyhow::Result<()> {
    const FORGED: u64 = 1 << 62;
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let run = async {
            let (_dir, pool) = db().await?;
            let inbox = SqliteInbox::new(pool);
            let t0 = now_ms() - secs(3600);
            for seq in [1, FORGED] {
                let mut m = msg("orders", "k", seq);
                Sequence {
                    producer: "forged-producer".into(),
                    topic: "orders".into(),
                    partition: 0,
                    seq,
                }
                .stamp(&mut m);
                assert_eq!(record(&inbox, &m, t0).await?, InboxOutcome::New);
            }
            reconcile_live(None::<&SqliteOutbox>, &inbox, CONSUMER, GRACE, now_ms())
                .await
                .map_err(anyhow::Error::from)
        };
        let report = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run));
        let _ = done.send(report);
    });
    let report = result
        .recv_timeout(Duration::from_secs(120))
        .map_err(|_| {
            anyhow::anyhow!(
                "reconcile_live did not return within 120 s over two stored numbers: the hole walk is not bounded by what is stored"
            )
        })??;
    let p = &report.partitions[0].progress;
    assert_eq!((p.floor, p.high, p.holes), (0, FORGED, FORGED - 2));
    // the first LIST_LIMIT missing numbers are listed, in order: 2, 3, …
    assert_eq!(report.missing.len(), custody_engine::live::LIST_LIMIT);
    assert_eq!(report.missing[0].seq, 2);
    assert_eq!(
        report.missing.last().map(|m| m.seq),
        Some(custody_engine::live::LIST_LIMIT as u64 + 1)
    );
    assert_eq!(report.in_flight, 0);
    Ok(())
}
