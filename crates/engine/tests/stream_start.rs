//! Issue 11, scenario 5: a consumer on a stream that does not begin at 1
//! (JetStream `max_age`, a consumer added later) says so and starts its floor
//! there; one number that never arrives pins the inbox only for
//! `consumer.gap-accept-after`, then the consumer accepts it as lost itself,
//! with an audit record. Real SQLite inbox, the consumer's own housekeeping
//! step (`Consumer::watermarks`).

mod common;

use std::time::Duration;

use chrono::{SubsecRound, Utc};
use common::Recorder;
use custody_core::{InboxOutcome, InboxStore, Message, PartitionProgress, Sequence};
use custody_engine::{Consumer, ConsumerConfig};
use custody_sqlite::SqliteInbox;
use custody_testkit::memory::MemoryBroker;

fn numbered(partition: u32, seq: u64) -> anyhow::Result<Message> {
    let mut m = Message::builder("orders", "k", "T").json(&seq)?.build()?;
    Sequence {
        producer: "p1".into(),
        topic: "orders".into(),
        partition,
        seq,
    }
    .stamp(&mut m);
    Ok(m)
}

fn summary(progress: &[PartitionProgress]) -> Vec<(u32, u64, u64)> {
    progress
        .iter()
        .map(|p| (p.partition, p.floor, p.holes))
        .collect()
}

#[tokio::test]
async fn a_stream_that_starts_above_one_starts_the_floor_there() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pool = custody_sqlite::connect(&dir.path().join("b.db").to_string_lossy()).await?;
    custody_sqlite::migrate(&pool).await?;
    sqlx::query(common::EFFECTS_SQLITE).execute(&pool).await?;
    let inbox = SqliteInbox::new(pool.clone());
    let now = Utc::now().trunc_subsecs(3);
    let two_minutes_ago = now - chrono::Duration::minutes(2);
    // partition 0: the stream begins at 41 (42 lost too: a real gap);
    // partition 1: begins at 1, 2 is missing; partition 2: begins at 10,
    // but just now (lower numbers may still be in flight)
    for (part, seq, at) in [
        (0, 41, two_minutes_ago),
        (0, 43, two_minutes_ago),
        (1, 1, two_minutes_ago),
        (1, 3, two_minutes_ago),
        (2, 10, now),
    ] {
        let mut tx = inbox.begin().await?;
        let out = inbox
            .record(&mut tx, "billing", &numbered(part, seq)?, at)
            .await?;
        inbox.commit(tx).await?;
        assert_eq!(out, InboxOutcome::New);
    }
    let broker = MemoryBroker::default();
    let mut cfg = ConsumerConfig::new("billing");
    cfg.gap_grace = Duration::from_secs(60);
    let mut c = Consumer::new(
        inbox.clone(),
        broker.subscribe("billing"),
        Recorder::default(),
        cfg,
    );
    let progress = c.watermarks(now).await?;
    assert_eq!(
        summary(&progress),
        vec![(0, 41, 1), (1, 1, 1), (2, 0, 9)],
        "partition 0 starts at 41 (42 still a gap); 1 has history; 2 is too young"
    );
    let audit: Vec<(i64, String, i64, String)> = sqlx::query_as(
        "SELECT producer_partition, numbers, new_floor, accepted_by FROM custody_gap_accepted",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        audit,
        vec![(0, "1-40".into(), 40, "consumer:billing".into())]
    );

    // A lower number of partition 0 arrives after all: dead-lettered.
    let late = numbered(0, 7)?;
    let mut tx = inbox.begin().await?;
    let out = inbox.record(&mut tx, "billing", &late, now).await?;
    inbox.commit(tx).await?;
    assert_eq!(out, InboxOutcome::Duplicate);
    let dead = custody_sqlite::dead_letters(&pool).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, Some(late.id));

    // Eight days on, nothing came: the bound (gap-accept-after, 7 days)
    // accepts 42 of partition 0 and 2 of partition 1, and the floors move.
    let later = now + chrono::Duration::days(8);
    let progress = c.watermarks(later).await?;
    assert_eq!(
        summary(&progress),
        vec![(0, 43, 0), (1, 3, 0), (2, 10, 0)],
        "{progress:?}"
    );
    let by_consumer: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM custody_gap_accepted WHERE accepted_by = 'consumer:billing'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(by_consumer, 4);
    Ok(())
}
