//! Retention on PostgreSQL: what is particular to it (the reader checkpoint
//! in transaction-id order). The prune scenarios every store shares are in
//! the conformance suite (tests/conformance.rs).
#![allow(missing_docs)]

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use custody_core::{OutboxStore, PublishAck, Subscriber};
use custody_postgres::{PgEmbeddedSubscriber, PgOutbox};
use sqlx::{Connection, PgPool};

use common::{db, msg, settle};

const ALL: [u32; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

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
