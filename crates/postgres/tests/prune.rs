//! Retention: OutboxStore::prune against a real PostgreSQL.
#![allow(missing_docs)]

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use custody_core::{partition_for, OutboxStore, PublishAck, Subscriber};
use custody_postgres::{set_checkpoint, PgEmbeddedSubscriber, PgOutbox};
use sqlx::{Connection, PgPool};

use common::{db, msg, settle};

const ALL: [u32; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

async fn enqueue(outbox: &PgOutbox, pool: &PgPool, keys: &[&str]) -> anyhow::Result<Vec<i64>> {
    let mut tx = pool.begin().await?;
    let mut out = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        out.push(outbox.enqueue(&mut tx, &msg("orders", k, i as u64)).await?);
    }
    tx.commit().await?;
    Ok(out)
}

/// Mark `positions` published at `at` (the relay's own UPDATE, with a lease).
async fn publish(outbox: &PgOutbox, positions: &[i64], at: DateTime<Utc>) -> anyhow::Result<()> {
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

async fn remaining(pool: &PgPool) -> anyhow::Result<Vec<i64>> {
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
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let outbox = PgOutbox::new(pool.clone());
    let pending = enqueue(&outbox, &pool, &["a", "b", "c"]).await?;
    // a parked pending row (failed once) is still pending
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
    assert_eq!(outbox.prune(&ALL, far_future, 1000).await?, 0);
    assert_eq!(remaining(&pool).await?, pending);
    Ok(())
}

#[tokio::test]
async fn old_published_and_dead_rows_go_in_batches_newer_ones_stay() -> anyhow::Result<()> {
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let outbox = PgOutbox::new(pool.clone());
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
    assert_eq!(outbox.prune(&ALL, cutoff, 4).await?, 4);
    assert_eq!(outbox.prune(&ALL, cutoff, 4).await?, 4);
    assert_eq!(outbox.prune(&ALL, cutoff, 4).await?, 2);
    assert_eq!(outbox.prune(&ALL, cutoff, 4).await?, 0);
    let mut kept = recent.clone();
    kept.extend(&dead);
    kept.extend(&pending);
    assert_eq!(
        remaining(&pool).await?,
        kept,
        "only the old published rows go"
    );

    // the dead row counts from enqueued_at (it has no published_at); it is
    // still in the dead-letter table after the prune
    let later = Utc::now() + chrono::Duration::minutes(1);
    assert_eq!(outbox.prune(&ALL, later, 100).await?, 4);
    assert_eq!(remaining(&pool).await?, pending);
    let letters: i64 = sqlx::query_scalar("SELECT count(*) FROM custody_dead_letter")
        .fetch_one(&pool)
        .await?;
    assert_eq!(letters, 1);
    Ok(())
}

#[tokio::test]
async fn only_the_given_partitions_are_touched() -> anyhow::Result<()> {
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let outbox = PgOutbox::new(pool.clone());
    // two keys in different partitions
    let a = "key-a";
    let b = (0..100)
        .map(|i| format!("key-{i}"))
        .find(|k| partition_for(k, 16) != partition_for(a, 16))
        .unwrap_or_else(|| panic!("no key in another partition"));
    let rows_a = enqueue(&outbox, &pool, &[a, a]).await?;
    let rows_b = enqueue(&outbox, &pool, &[&b, &b]).await?;
    let all: Vec<i64> = rows_a.iter().chain(&rows_b).copied().collect();
    publish(&outbox, &all, hours_ago(48)).await?;

    let pb = partition_for(&b, 16);
    assert_eq!(outbox.prune(&[pb], hours_ago(24), 100).await?, 2);
    assert_eq!(remaining(&pool).await?, rows_a);
    assert_eq!(outbox.prune(&[], hours_ago(24), 100).await?, 0);
    assert_eq!(remaining(&pool).await?, rows_a);
    Ok(())
}

#[tokio::test]
async fn rows_an_embedded_reader_has_not_read_are_kept() -> anyhow::Result<()> {
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let outbox = PgOutbox::new(pool.clone());
    let rows = enqueue(&outbox, &pool, &["a"; 6]).await?;
    publish(&outbox, &rows, hours_ago(48)).await?;
    set_checkpoint(&pool, "slow", rows[1]).await?;
    set_checkpoint(&pool, "fast", rows[4]).await?;

    // the slowest reader has read rows[0..=1]
    assert_eq!(outbox.prune(&ALL, hours_ago(24), 100).await?, 2);
    assert_eq!(remaining(&pool).await?, rows[2..].to_vec());

    set_checkpoint(&pool, "slow", rows[5]).await?;
    // now "fast" (at rows[4]) is the slowest
    assert_eq!(outbox.prune(&ALL, hours_ago(24), 100).await?, 3);
    assert_eq!(remaining(&pool).await?, rows[5..].to_vec());
    Ok(())
}

/// Readers go in (txid, position) order: a row at a lower position but with a
/// higher transaction id comes *after* the checkpoint and must be kept, though
/// a plain `position <= checkpoint` rule would delete it.
#[tokio::test]
async fn reader_checkpoint_is_respected_in_txid_order() -> anyhow::Result<()> {
    let Some((db, pool)) = db().await? else {
        return Ok(());
    };
    let outbox = PgOutbox::new(pool.clone());
    let mut c1 = sqlx::PgConnection::connect(&db.url).await?;
    let mut c2 = sqlx::PgConnection::connect(&db.url).await?;
    // tx1 takes its transaction id first, tx2 inserts first
    let mut tx1 = c1.begin().await?;
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *tx1)
        .await?;
    let mut tx2 = c2.begin().await?;
    let low = outbox.enqueue(&mut tx2, &msg("orders", "x", 1)).await?;
    tx2.commit().await?;
    let high = outbox.enqueue(&mut tx1, &msg("orders", "y", 2)).await?;
    tx1.commit().await?;
    assert!(low < high);
    settle(&pool).await?;
    publish(&outbox, &[low, high], hours_ago(48)).await?;

    // the reader sees `high` first (older transaction) and acknowledges it
    let mut sub = PgEmbeddedSubscriber::new(pool.clone(), "reader", &[]).await?;
    let got = sub.fetch(1, Duration::from_secs(5)).await?;
    assert_eq!(got.iter().map(|d| d.token).collect::<Vec<_>>(), vec![high]);
    sub.ack(high).await?;

    assert_eq!(outbox.prune(&ALL, hours_ago(24), 100).await?, 1);
    assert_eq!(
        remaining(&pool).await?,
        vec![low],
        "a row the reader has not read yet was pruned"
    );

    let got = sub.fetch(1, Duration::from_secs(5)).await?;
    assert_eq!(got.iter().map(|d| d.token).collect::<Vec<_>>(), vec![low]);
    sub.ack(low).await?;
    assert_eq!(outbox.prune(&ALL, hours_ago(24), 100).await?, 1);
    assert!(remaining(&pool).await?.is_empty());
    Ok(())
}
