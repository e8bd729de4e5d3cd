//! Issue 11, scenario 4 on SQLite: a copy of a producer's database file is a
//! producer of its own (the id is bound to the file), numbering from 1, and
//! a consumer applies the messages of both. Before, the copy numbered under
//! the original's id with numbers the consumer's floor already covered.
mod common;

use std::time::Duration;

use chrono::Utc;
use common::{db, msg};
use custody_core::{InboxOutcome, InboxStore, Message, OutboxStore, PublishAck, Sequence};
use custody_sqlite::{SqliteInbox, SqliteOutbox};
use sqlx::SqlitePool;

const TTL: Duration = Duration::from_secs(30);

/// What the relay does: producer id first, then lease, number, mark, stamp.
async fn produce(pool: &SqlitePool, n: u64) -> anyhow::Result<Vec<Message>> {
    let outbox = SqliteOutbox::new(pool.clone());
    let mut tx = pool.begin().await?;
    let msgs: Vec<Message> = (0..n).map(|i| msg("orders", "k", i)).collect();
    outbox.enqueue_batch(&mut tx, &msgs).await?;
    tx.commit().await?;
    let producer = outbox
        .producer_id()
        .await?
        .ok_or_else(|| anyhow::anyhow!("SQLite outboxes number messages"))?;
    let now = Utc::now();
    let all = outbox.acquire_leases("r", TTL, now).await?;
    let mut batch = outbox.fetch_batch(&all, 100, now).await?;
    outbox.assign_sequences("r", &mut batch, now).await?;
    let acked: Vec<(i64, PublishAck)> = batch
        .iter()
        .map(|r| (r.position, PublishAck::default()))
        .collect();
    outbox.mark_published("r", &acked, now).await?;
    outbox.release_leases("r").await?;
    let mut out = Vec::new();
    for mut r in batch {
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
        out.push(r.message);
    }
    Ok(out)
}

async fn consume(inbox: &SqliteInbox, msgs: &[Message]) -> anyhow::Result<Vec<InboxOutcome>> {
    let mut out = Vec::new();
    for m in msgs {
        let mut tx = inbox.begin().await?;
        out.push(inbox.record(&mut tx, "billing", m, Utc::now()).await?);
        inbox.commit(tx).await?;
    }
    Ok(out)
}

fn seqs(msgs: &[Message]) -> Vec<u64> {
    msgs.iter()
        .filter_map(|m| Sequence::of(m).map(|s| s.seq))
        .collect()
}

#[tokio::test]
async fn a_copied_file_is_a_new_producer_and_nothing_is_dropped() -> anyhow::Result<()> {
    let (dir, orders) = db().await?;
    let (_b, billing) = db().await?;
    let inbox = SqliteInbox::new(billing.clone());
    let before = produce(&orders, 3).await?;
    assert_eq!(seqs(&before), vec![1, 2, 3]);
    assert_eq!(consume(&inbox, &before).await?, vec![InboxOutcome::New; 3]);
    inbox
        .compact("billing", Utc::now() - chrono::Duration::hours(1), 100)
        .await?;

    // copy the file (closed: the WAL is checkpointed into it)
    orders.close().await;
    let original = dir.path().join("custody.db");
    let copy = dir.path().join("copy.db");
    std::fs::copy(&original, &copy)?;
    let orders = custody_sqlite::connect(&original.to_string_lossy()).await?;
    let copied = custody_sqlite::connect(&copy.to_string_lossy()).await?;

    let from_original = produce(&orders, 3).await?;
    let from_copy = produce(&copied, 3).await?;
    let id = |m: &[Message]| Sequence::of(&m[0]).map(|s| s.producer);
    assert_eq!(id(&from_original), id(&before), "the original keeps its id");
    assert_ne!(
        id(&from_copy),
        id(&before),
        "the copy must be a producer of its own"
    );
    assert_eq!(seqs(&from_original), vec![4, 5, 6]);
    assert_eq!(seqs(&from_copy), vec![1, 2, 3], "numbering restarts at 1");
    assert_eq!(
        consume(&inbox, &from_original).await?,
        vec![InboxOutcome::New; 3]
    );
    inbox
        .compact("billing", Utc::now() - chrono::Duration::hours(1), 100)
        .await?;
    assert_eq!(
        consume(&inbox, &from_copy).await?,
        vec![InboxOutcome::New; 3],
        "the copy's messages were dropped as duplicates"
    );
    let renewed: i64 = sqlx::query_scalar("SELECT count(*) FROM custody_producer_history")
        .fetch_one(&copied)
        .await?;
    assert_eq!(renewed, 1);
    Ok(())
}
