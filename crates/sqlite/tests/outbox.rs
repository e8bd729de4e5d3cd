//! Outbox: transactional enqueue, batch order, parked keys, dead letters, wake-ups.
mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::{all_partitions, db, msg};
use custody_core::{Message, OutboxStore, Subscriber};
use custody_sqlite::{dead_letters, SqliteEmbeddedSubscriber, SqliteOutbox};

#[tokio::test]
async fn rollback_leaves_no_message_and_commit_exactly_one() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let parts = all_partitions(outbox.partitions());

    let rolled_back = msg("orders", "o-1", 1);
    let mut tx = pool.begin().await?;
    outbox.enqueue(&mut tx, &rolled_back).await?;
    tx.rollback().await?;

    assert!(outbox
        .fetch_batch(&parts, 100, Utc::now())
        .await?
        .is_empty());
    let mut reader =
        SqliteEmbeddedSubscriber::new(pool.clone(), "r", &["orders".to_owned()]).await?;
    assert!(reader
        .fetch(10, Duration::from_millis(100))
        .await?
        .is_empty());

    let committed = msg("orders", "o-1", 2);
    let mut tx = pool.begin().await?;
    let position = outbox.enqueue(&mut tx, &committed).await?;
    tx.commit().await?;

    let batch = outbox.fetch_batch(&parts, 100, Utc::now()).await?;
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].position, position);
    assert_eq!(batch[0].message, committed);
    assert_eq!(batch[0].attempts, 0);
    assert_eq!(
        batch[0].partition,
        custody_core::partition_for("o-1", outbox.partitions())
    );

    let got = reader.fetch(10, Duration::from_millis(100)).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.as_ref().ok(), Some(&committed));
    assert_eq!(got[0].token, position);
    Ok(())
}

#[tokio::test]
async fn batch_enqueue_of_1000_keeps_order() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let msgs: Vec<Message> = (0..1000)
        .map(|i| msg("orders", &format!("k{}", i % 37), i))
        .collect();

    let mut tx = pool.begin().await?;
    let positions = outbox.enqueue_batch(&mut tx, &msgs).await?;
    tx.commit().await?;

    assert_eq!(positions.len(), 1000);
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions increase"
    );

    let batch = outbox
        .fetch_batch(&all_partitions(outbox.partitions()), 5000, Utc::now())
        .await?;
    let got: Vec<_> = batch.iter().map(|r| r.message.id).collect();
    let want: Vec<_> = msgs.iter().map(|m| m.id).collect();
    assert_eq!(got, want, "fetch_batch returns enqueue order");
    let got_pos: Vec<i64> = batch.iter().map(|r| r.position).collect();
    assert_eq!(got_pos, positions);
    Ok(())
}

#[tokio::test]
async fn duplicate_message_id_is_an_invalid_message() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let m = msg("orders", "k", 1);
    let mut conn = pool.acquire().await?;
    outbox.enqueue(&mut conn, &m).await?;
    let err = outbox
        .enqueue(&mut conn, &m)
        .await
        .expect_err("second enqueue of one id must fail");
    assert!(err.to_string().contains("fresh id"), "{err}");
    assert!(!err.retryable());
    Ok(())
}

#[tokio::test]
async fn parked_key_holds_back_only_its_own_key() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let parts = all_partitions(outbox.partitions());
    let (a1, a2, b1) = (msg("t", "a", 1), msg("t", "a", 2), msg("t", "b", 1));
    let mut tx = pool.begin().await?;
    let pos = outbox
        .enqueue_batch(&mut tx, &[a1.clone(), a2.clone(), b1.clone()])
        .await?;
    tx.commit().await?;

    let now = Utc::now();
    let retry_at = now + chrono::Duration::seconds(60);
    outbox
        .acquire_leases("r", std::time::Duration::from_secs(600), now)
        .await?;
    let parked = outbox
        .record_failure("r", pos[0], "broker said no", retry_at, now)
        .await?;
    assert_eq!(parked, custody_core::RowWrite::Written);

    let ids = |batch: Vec<custody_core::OutboxRecord>| -> Vec<uuid::Uuid> {
        batch.into_iter().map(|r| r.message.id).collect()
    };
    assert_eq!(
        ids(outbox.fetch_batch(&parts, 10, now).await?),
        vec![b1.id],
        "key a is parked, key b flows"
    );
    // Once retry_at has passed, the parked message is first again.
    let later = outbox
        .fetch_batch(&parts, 10, retry_at + chrono::Duration::seconds(1))
        .await?;
    assert_eq!(later[0].attempts, 1);
    assert_eq!(ids(later), vec![a1.id, a2.id, b1.id]);

    let dead = outbox
        .dead_letter("r", pos[0], "poison: broker rejects it for good", now)
        .await?;
    assert_eq!(dead, custody_core::RowWrite::Written);
    assert_eq!(
        ids(outbox.fetch_batch(&parts, 10, now).await?),
        vec![a2.id, b1.id],
        "after dead-lettering, key a flows again"
    );

    let dead = dead_letters(&pool).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, Some(a1.id));
    assert_eq!(dead[0].origin, "relay");
    assert_eq!(dead[0].error, "poison: broker rejects it for good");
    assert_eq!(dead[0].attempts, 1);
    assert_eq!(dead[0].key.as_deref(), Some("a"));
    let envelope: Message = serde_json::from_str(dead[0].envelope.as_deref().unwrap_or(""))?;
    assert_eq!(envelope, a1);
    Ok(())
}

#[tokio::test]
async fn damaged_row_is_dead_lettered_not_an_error() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let (bad, good) = (msg("t", "k", 1), msg("t", "k", 2));
    let mut tx = pool.begin().await?;
    let pos = outbox
        .enqueue_batch(&mut tx, &[bad.clone(), good.clone()])
        .await?;
    tx.commit().await?;
    sqlx::query("UPDATE custody_outbox SET kind = 'rumour' WHERE position = ?1")
        .bind(pos[0])
        .execute(&pool)
        .await?;

    let batch = outbox
        .fetch_batch(&all_partitions(outbox.partitions()), 10, Utc::now())
        .await?;
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].message, good);
    let dead = dead_letters(&pool).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, Some(bad.id));
    assert!(dead[0].error.contains("column kind"), "{}", dead[0].error);
    Ok(())
}

#[tokio::test]
async fn commit_wakes_waiter_and_the_row_is_visible() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let parts = all_partitions(outbox.partitions());

    let waiter = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            outbox.wait_for_new(Duration::from_secs(10)).await;
            let waited = start.elapsed();
            let seen = outbox
                .fetch_batch(&parts, 10, Utc::now())
                .await
                .map(|b| b.len());
            (waited, seen)
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut tx = pool.begin().await?;
    outbox.enqueue(&mut tx, &msg("t", "k", 1)).await?;
    // Not committed yet: the waiter must still be waiting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "woken before the commit");
    tx.commit().await?;

    let (waited, seen) = waiter.await?;
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    assert_eq!(seen?, 1, "woken waiter sees the committed row");
    Ok(())
}

#[tokio::test]
async fn rollback_does_not_arm_a_later_commit() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let mut conn = pool.acquire().await?;
    {
        use sqlx::Connection;
        let mut tx = conn.begin().await?;
        outbox.enqueue(&mut tx, &msg("t", "k", 1)).await?;
        tx.rollback().await?;
    }
    // Another connection commits (autocommit) so the rolled-back position
    // is visible again: a stale hook would now wake a waiter at once.
    outbox
        .enqueue(&mut *pool.acquire().await?, &msg("t", "k", 2))
        .await?;
    let start = Instant::now();
    outbox.wait_for_new(Duration::from_secs(5)).await;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "autocommit enqueue wakes"
    );

    let outbox2 = outbox.clone();
    let waiter =
        tokio::spawn(async move { outbox2.wait_for_new(Duration::from_millis(700)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    // An unrelated commit on the connection whose transaction rolled back.
    sqlx::query("CREATE TABLE unrelated (x INTEGER)")
        .execute(&mut *conn)
        .await?;
    waiter.await?;
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "an unrelated commit woke the waiter after {:?}",
        start.elapsed()
    );
    Ok(())
}

/// Issue 11, scenario 1: a producer cannot commit a message no consumer
/// could store (PostgreSQL refuses NUL in text): enqueue refuses a NUL in
/// the key or a header value, and a control character in the topic, with a
/// reason naming it; nothing is written.
#[tokio::test]
async fn enqueue_refuses_nul_and_control_characters() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let mut nul_key = msg("orders", "o-1", 1);
    nul_key.key = "o\0-1".into();
    let mut nul_header = msg("orders", "o-1", 2);
    nul_header
        .headers
        .insert("correlationid".into(), "req\0".into());
    let mut control_topic = msg("orders", "o-1", 3);
    control_topic.topic = "ord\u{7}ers".into();
    for (m, what) in [
        (&nul_key, "key holds a NUL"),
        (&nul_header, "header \"correlationid\" holds a NUL"),
        (&control_topic, "topic holds the control character"),
    ] {
        let mut tx = pool.begin().await?;
        let err = outbox
            .enqueue(&mut tx, m)
            .await
            .expect_err("must be refused")
            .to_string();
        assert!(err.contains(what), "{err}");
        tx.commit().await?;
    }
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM custody_outbox")
        .fetch_one(&pool)
        .await?;
    assert_eq!(n, 0);
    Ok(())
}

/// Issue 11, scenario 7: a relay that lost its lease can neither park nor
/// dead-letter a row of that partition (nor write a skip marker); the new
/// holder still sees it pending and unparked.
#[tokio::test]
async fn a_relay_that_lost_its_lease_cannot_park_or_dead_letter() -> anyhow::Result<()> {
    use custody_core::RowWrite;
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let parts = all_partitions(outbox.partitions());
    let ttl = std::time::Duration::from_secs(10);
    let m = msg("t", "a", 1);
    let mut tx = pool.begin().await?;
    let pos = outbox.enqueue(&mut tx, &m).await?;
    tx.commit().await?;

    let t0 = Utc::now();
    assert_eq!(outbox.acquire_leases("old", ttl, t0).await?, parts);
    let batch = outbox.fetch_batch(&parts, 10, t0).await?;
    assert_eq!(batch.len(), 1);
    // "old" stalls past its lease; "new" takes every partition
    let t1 = t0 + chrono::Duration::seconds(11);
    assert_eq!(outbox.acquire_leases("new", ttl, t1).await?, parts);

    let retry_at = t1 + chrono::Duration::minutes(5);
    assert_eq!(
        outbox
            .record_failure("old", pos, "late failure", retry_at, t1)
            .await?,
        RowWrite::Fenced
    );
    assert_eq!(
        outbox
            .dead_letter("old", pos, "late dead letter", t1)
            .await?,
        RowWrite::Fenced
    );
    let (status, attempts, dead, rows): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT status FROM custody_outbox WHERE position = ?1),
                (SELECT attempts FROM custody_outbox WHERE position = ?1),
                (SELECT COUNT(*) FROM custody_dead_letter),
                (SELECT COUNT(*) FROM custody_outbox)",
    )
    .bind(pos)
    .fetch_one(&pool)
    .await?;
    assert_eq!(
        (status, attempts, dead, rows),
        (0, 0, 0, 1),
        "nothing written"
    );
    let batch = outbox.fetch_batch(&parts, 10, t1).await?;
    assert_eq!(batch.len(), 1, "the new holder publishes it, unparked");

    // the holder's own writes go through
    assert_eq!(
        outbox.dead_letter("new", pos, "poison", t1).await?,
        RowWrite::Written
    );
    assert_eq!(
        outbox.dead_letter("new", pos, "poison", t1).await?,
        RowWrite::NotPending
    );
    Ok(())
}
