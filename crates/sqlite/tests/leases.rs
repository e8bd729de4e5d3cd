//! Relay partition leases: fair share, takeover after ttl, fencing.
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Utc;
use common::{db, msg};
use custody_core::{partition_for, OutboxStore, PublishAck};
use custody_sqlite::SqliteOutbox;

const TTL: Duration = Duration::from_secs(10);

fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

#[tokio::test]
async fn relays_share_partitions_fairly_and_take_over_dead_ones() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let all: Vec<u32> = (0..16).collect();
    let t0 = Utc::now();

    assert_eq!(
        outbox.acquire_leases("a", TTL, t0).await?,
        all,
        "alone, a holds all"
    );

    // b joins: everything is leased to a, so b waits for a to give half back.
    let mut held_a = Vec::new();
    let mut held_b = Vec::new();
    for round in 0..2 {
        let t = t0 + secs(1 + 2 * round);
        held_b = outbox.acquire_leases("b", TTL, t).await?;
        held_a = outbox.acquire_leases("a", TTL, t + secs(1)).await?;
    }
    assert_eq!(
        held_a,
        (0..8).collect::<Vec<u32>>(),
        "a keeps the lowest half"
    );
    assert_eq!(held_b, (8..16).collect::<Vec<u32>>());
    // Stable once shared.
    assert_eq!(outbox.acquire_leases("b", TTL, t0 + secs(5)).await?, held_b);
    let sa: BTreeSet<u32> = held_a.iter().copied().collect();
    let sb: BTreeSet<u32> = held_b.iter().copied().collect();
    assert!(sa.is_disjoint(&sb));
    assert_eq!(sa.union(&sb).copied().collect::<Vec<_>>(), all);

    // a stops heartbeating (last at t0 + 4s); after the ttl b takes everything.
    let after_ttl = t0 + secs(4) + chrono::Duration::from_std(TTL)? + secs(1);
    assert_eq!(outbox.acquire_leases("b", TTL, after_ttl).await?, all);
    Ok(())
}

#[tokio::test]
async fn released_leases_are_free_at_once() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone()).with_partitions(4);
    let t0 = Utc::now();
    outbox.acquire_leases("a", TTL, t0).await?;
    outbox.acquire_leases("b", TTL, t0).await?;
    outbox.release_leases("a").await?;
    assert_eq!(
        outbox.acquire_leases("b", TTL, t0 + secs(1)).await?,
        vec![0, 1, 2, 3]
    );
    Ok(())
}

#[tokio::test]
async fn mark_published_is_fenced_by_the_lease() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let t0 = Utc::now();
    let m = msg("t", "key-1", 1);
    let mut tx = pool.begin().await?;
    let position = outbox.enqueue(&mut tx, &m).await?;
    tx.commit().await?;
    let p = partition_for("key-1", 16);

    let held = outbox.acquire_leases("a", TTL, t0).await?;
    assert!(held.contains(&p));
    assert_eq!(
        outbox
            .mark_published("b", &[(position, PublishAck::default())], t0)
            .await?,
        0,
        "b holds no lease on partition {p}"
    );
    // a's lease expired: a is fenced off too.
    assert_eq!(
        outbox
            .mark_published("a", &[(position, PublishAck::default())], t0 + secs(11))
            .await?,
        0
    );
    assert_eq!(
        outbox
            .mark_published("a", &[(position, PublishAck::default())], t0 + secs(1))
            .await?,
        1
    );
    assert!(
        outbox
            .fetch_batch(&held, 10, t0 + secs(1))
            .await?
            .is_empty(),
        "published rows are not fetched again"
    );
    Ok(())
}

/// Issue 11, "Also": two processes with one relay id on one SQLite file.
/// The second is refused while the first's heartbeat is live, cannot release
/// the first's leases, and gets the id once the first's heartbeat is stale.
#[tokio::test]
async fn a_second_process_with_the_same_relay_id_is_refused() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let p1 = SqliteOutbox::new(pool.clone()).with_instance("process-1");
    let p2 = SqliteOutbox::new(pool.clone()).with_instance("process-2");
    let all: Vec<u32> = (0..p1.partitions()).collect();
    let t0 = Utc::now();
    assert_eq!(p1.acquire_leases("r", TTL, t0).await?, all);
    match p2.acquire_leases("r", TTL, t0).await {
        Err(custody_core::Error::RelayIdInUse {
            ref relay,
            ref other,
            live,
            ..
        }) => assert_eq!(
            (relay.as_str(), other.as_str(), live),
            ("r", "process-1", false)
        ),
        other => panic!("expected RelayIdInUse, got {other:?}"),
    }
    p2.release_leases("r").await?;
    assert_eq!(p1.acquire_leases("r", TTL, t0).await?, all);
    let later = t0 + chrono::Duration::seconds(60);
    assert_eq!(p2.acquire_leases("r", TTL, later).await?, all);
    assert!(p1.acquire_leases("r", TTL, later).await.is_err());
    Ok(())
}
