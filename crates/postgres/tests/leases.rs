//! Partition leases of several relays.
#![allow(missing_docs)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Utc;
use custody_core::{OutboxStore, PublishAck};
use custody_postgres::PgOutbox;

use common::{db, msg, settle};

const TTL: Duration = Duration::from_secs(30);

#[tokio::test]
async fn one_relay_gets_all_two_split_evenly() -> anyhow::Result<()> {
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let outbox = PgOutbox::new(pool);
    let now = Utc::now();
    let all: Vec<u32> = (0..16).collect();
    assert_eq!(outbox.acquire_leases("r1", TTL, now).await?, all);

    // r2 joins: it gets nothing yet (all held), r1 gives back its upper half
    let r2 = outbox.acquire_leases("r2", TTL, now).await?;
    assert!(r2.is_empty(), "{r2:?}");
    let r1 = outbox.acquire_leases("r1", TTL, now).await?;
    assert_eq!(r1, (0..8).collect::<Vec<_>>());
    let r2 = outbox.acquire_leases("r2", TTL, now).await?;
    assert_eq!(r2, (8..16).collect::<Vec<_>>());
    // stable on renewal
    assert_eq!(outbox.acquire_leases("r1", TTL, now).await?, r1);
    assert_eq!(outbox.acquire_leases("r2", TTL, now).await?, r2);

    outbox.release_leases("r2").await?;
    assert_eq!(outbox.acquire_leases("r1", TTL, now).await?, all);
    Ok(())
}

#[tokio::test]
async fn concurrent_acquire_never_overlaps() -> anyhow::Result<()> {
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let outbox = PgOutbox::new(pool);
    for round in 0..10 {
        let now = Utc::now();
        let mut tasks = tokio::task::JoinSet::new();
        for r in 0..4 {
            let outbox = outbox.clone();
            tasks.spawn(async move {
                let relay = format!("r{r}");
                let held = outbox.acquire_leases(&relay, TTL, now).await;
                (relay, held)
            });
        }
        let mut seen = BTreeSet::new();
        while let Some(res) = tasks.join_next().await {
            let (relay, held) = res?;
            let _ = &relay;
            let held = held?;
            // (in the first round relays may not see each other's
            // uncommitted heartbeats and take more than 4; they converge)
            for p in held {
                assert!(
                    seen.insert(p),
                    "round {round}: partition {p} held twice ({relay})"
                );
            }
        }
    }
    // converged: each holds exactly 4
    let now = Utc::now();
    let mut union = BTreeSet::new();
    for r in 0..4 {
        let held = outbox.acquire_leases(&format!("r{r}"), TTL, now).await?;
        assert_eq!(held.len(), 4, "r{r} holds {held:?}");
        union.extend(held);
    }
    assert_eq!(union.len(), 16);
    Ok(())
}

#[tokio::test]
async fn dead_relays_partitions_move_after_ttl_and_it_is_fenced() -> anyhow::Result<()> {
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let outbox = PgOutbox::new(pool.clone());
    let t0 = Utc::now();
    let mut tx = pool.begin().await?;
    let pos = outbox.enqueue(&mut tx, &msg("orders", "k", 1)).await?;
    tx.commit().await?;
    settle(&pool).await?;
    let all: Vec<u32> = (0..16).collect();
    let rec = outbox.fetch_batch(&all, 1, t0).await?;
    let partition = rec[0].partition;

    assert_eq!(outbox.acquire_leases("r1", TTL, t0).await?, all);
    assert!(outbox.acquire_leases("r2", TTL, t0).await?.is_empty());
    // r1 dies; before the ttl nothing moves
    let t1 = t0 + chrono::Duration::seconds(10);
    assert!(outbox.acquire_leases("r2", TTL, t1).await?.len() < 16);
    // after the ttl r2 takes everything
    let t2 = t0 + chrono::Duration::seconds(31);
    assert_eq!(outbox.acquire_leases("r2", TTL, t2).await?, all);

    // r1 (fenced) cannot mark; r2 can
    assert_eq!(
        outbox
            .mark_published("r1", &[(pos, PublishAck::default())], t2)
            .await?,
        0
    );
    assert_eq!(
        outbox
            .mark_published("r2", &[(pos, PublishAck::default())], t2)
            .await?,
        1
    );
    assert!(outbox.fetch_batch(&[partition], 10, t2).await?.is_empty());
    // r1 comes back: its leases are gone, and it gets its share only as r2 gives back
    assert!(outbox.acquire_leases("r1", TTL, t2).await?.is_empty());
    assert_eq!(outbox.acquire_leases("r2", TTL, t2).await?.len(), 8);
    assert_eq!(outbox.acquire_leases("r1", TTL, t2).await?.len(), 8);
    Ok(())
}

/// Issue 11, "Also": two processes with one relay id. The second is refused
/// while the first's heartbeat is live, cannot release the first's leases,
/// and gets the id once the first's heartbeat is stale (a crashed process).
#[tokio::test]
async fn a_second_process_with_the_same_relay_id_is_refused() -> anyhow::Result<()> {
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let p1 = PgOutbox::new(pool.clone()).with_instance("process-1");
    let p2 = PgOutbox::new(pool.clone()).with_instance("process-2");
    let t0 = Utc::now();
    let all: Vec<u32> = (0..16).collect();
    assert_eq!(p1.acquire_leases("r", TTL, t0).await?, all);

    let refused = p2.acquire_leases("r", TTL, t0).await;
    match refused {
        Err(custody_core::Error::RelayIdInUse {
            ref relay,
            ref other,
            live,
            ..
        }) => {
            assert_eq!(
                (relay.as_str(), other.as_str(), live),
                ("r", "process-1", false)
            );
        }
        other => panic!("expected RelayIdInUse, got {other:?}"),
    }
    let text = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(text.contains("\"r\"") && text.contains("--id"), "{text}");
    // the refused process's shutdown leaves the live one's leases alone
    p2.release_leases("r").await?;
    assert_eq!(p1.acquire_leases("r", TTL, t0).await?, all);

    // process 1 dies: its heartbeat goes stale, process 2 takes the id
    let later = t0 + chrono::Duration::seconds(31);
    assert_eq!(p2.acquire_leases("r", TTL, later).await?, all);
    assert!(p1.acquire_leases("r", TTL, later).await.is_err());
    Ok(())
}
