//! Retention: OutboxStore::prune on a real SQLite file.
mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{all_partitions, db, msg};
use custody_core::{partition_for, OutboxStore, PublishAck, Subscriber};
use custody_sqlite::{set_checkpoint, SqliteEmbeddedSubscriber, SqliteOutbox};
use sqlx::SqlitePool;

async fn enqueue(
    outbox: &SqliteOutbox,
    pool: &SqlitePool,
    keys: &[&str],
) -> anyhow::Result<Vec<i64>> {
    let mut tx = pool.begin().await?;
    let mut out = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        out.push(outbox.enqueue(&mut tx, &msg("orders", k, i as u64)).await?);
    }
    tx.commit().await?;
    Ok(out)
}

/// Mark `positions` published at `at` (the relay's own UPDATE, with a lease).
async fn publish(
    outbox: &SqliteOutbox,
    positions: &[i64],
    at: DateTime<Utc>,
) -> anyhow::Result<()> {
    outbox
        .acquire_leases("r", Duration::from_secs(600), Utc::now())
        .await?;
    let acked: Vec<(i64, PublishAck)> = positions
        .iter()
        .map(|p| (*p, PublishAck::default()))
        .collect();
    let n = outbox.mark_published("r", &acked, at).await?;
    assert_eq!(n as usize, positions.len(), "not all rows were marked");
    Ok(())
}

async fn remaining(pool: &SqlitePool) -> anyhow::Result<Vec<i64>> {
    Ok(
        sqlx::query_scalar("SELECT position FROM custody_outbox ORDER BY position")
            .fetch_all(pool)
            .await?,
    )
}

fn hours_ago(h: i64) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::hours(h)
}

#[tokio::test]
async fn pending_rows_are_never_pruned() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let all = all_partitions(outbox.partitions());
    let pending = enqueue(&outbox, &pool, &["a", "b", "c"]).await?;
    outbox
        .acquire_leases("r", Duration::from_secs(600), Utc::now())
        .await?;
    let _ = outbox
        .record_failure(
            "r",
            pending[0],
            "down",
            Utc::now() + chrono::Duration::hours(1),
            Utc::now(),
        )
        .await?;
    let far_future = Utc::now() + chrono::Duration::days(365);
    assert_eq!(outbox.prune(&all, far_future, 1000).await?, 0);
    assert_eq!(remaining(&pool).await?, pending);
    Ok(())
}

#[tokio::test]
async fn old_published_and_dead_rows_go_in_batches_newer_ones_stay() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let all = all_partitions(outbox.partitions());
    let old = enqueue(&outbox, &pool, &["a"; 10]).await?;
    let recent = enqueue(&outbox, &pool, &["b"; 3]).await?;
    let dead = enqueue(&outbox, &pool, &["c"]).await?;
    let pending = enqueue(&outbox, &pool, &["d"]).await?;
    publish(&outbox, &old, hours_ago(48)).await?;
    publish(&outbox, &recent, Utc::now()).await?;
    let _ = outbox
        .dead_letter("r", dead[0], "poison", Utc::now())
        .await?;

    let cutoff = hours_ago(24);
    assert_eq!(outbox.prune(&all, cutoff, 4).await?, 4);
    assert_eq!(outbox.prune(&all, cutoff, 4).await?, 4);
    assert_eq!(outbox.prune(&all, cutoff, 4).await?, 2);
    assert_eq!(outbox.prune(&all, cutoff, 4).await?, 0);
    let mut kept = recent.clone();
    kept.extend(&dead);
    kept.extend(&pending);
    assert_eq!(
        remaining(&pool).await?,
        kept,
        "only the old published rows go"
    );

    // the dead row counts from enqueued_at; it stays in the dead-letter table
    let later = Utc::now() + chrono::Duration::minutes(1);
    assert_eq!(outbox.prune(&all, later, 100).await?, 4);
    assert_eq!(remaining(&pool).await?, pending);
    let letters: i64 = sqlx::query_scalar("SELECT count(*) FROM custody_dead_letter")
        .fetch_one(&pool)
        .await?;
    assert_eq!(letters, 1);
    Ok(())
}

#[tokio::test]
async fn only_the_given_partitions_are_touched() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let n = outbox.partitions();
    let a = "key-a";
    let b = (0..100)
        .map(|i| format!("key-{i}"))
        .find(|k| partition_for(k, n) != partition_for(a, n))
        .unwrap_or_else(|| panic!("no key in another partition"));
    let rows_a = enqueue(&outbox, &pool, &[a, a]).await?;
    let rows_b = enqueue(&outbox, &pool, &[&b, &b]).await?;
    let both: Vec<i64> = rows_a.iter().chain(&rows_b).copied().collect();
    publish(&outbox, &both, hours_ago(48)).await?;

    assert_eq!(
        outbox
            .prune(&[partition_for(&b, n)], hours_ago(24), 100)
            .await?,
        2
    );
    assert_eq!(remaining(&pool).await?, rows_a);
    assert_eq!(outbox.prune(&[], hours_ago(24), 100).await?, 0);
    assert_eq!(remaining(&pool).await?, rows_a);
    Ok(())
}

#[tokio::test]
async fn rows_an_embedded_reader_has_not_read_are_kept() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let all = all_partitions(outbox.partitions());
    let rows = enqueue(&outbox, &pool, &["a"; 6]).await?;
    publish(&outbox, &rows, hours_ago(48)).await?;

    // a real reader reads and acknowledges the first two
    let mut reader = SqliteEmbeddedSubscriber::new(pool.clone(), "slow", &[]).await?;
    let got = reader.fetch(2, Duration::from_secs(1)).await?;
    assert_eq!(
        got.iter().map(|d| d.token).collect::<Vec<_>>(),
        rows[..2].to_vec()
    );
    for d in &got {
        reader.ack(d.token).await?;
    }
    set_checkpoint(&pool, "fast", rows[4]).await?;

    assert_eq!(outbox.prune(&all, hours_ago(24), 100).await?, 2);
    assert_eq!(remaining(&pool).await?, rows[2..].to_vec());

    set_checkpoint(&pool, "slow", rows[5]).await?;
    // now "fast" (at rows[4]) is the slowest
    assert_eq!(outbox.prune(&all, hours_ago(24), 100).await?, 3);
    assert_eq!(remaining(&pool).await?, rows[5..].to_vec());
    Ok(())
}
