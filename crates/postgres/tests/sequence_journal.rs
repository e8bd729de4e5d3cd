//! Where a sequence number lives between numbering and marking: the journal
//! (migration 0006). A relay that dies after numbering (and maybe publishing)
//! must leave its numbers to the next holder of the partition, a redriven
//! dead letter must not get its old number back, and the journal must not
//! grow.
#![allow(missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use custody_core::{OutboxRecord, OutboxStore, PublishAck, SentHistory};
use custody_postgres::PgOutbox;
use sqlx::PgPool;
use uuid::Uuid;

use common::{db, msg, settle};

const TTL: Duration = Duration::from_secs(30);

fn numbers(batch: &[OutboxRecord]) -> BTreeMap<Uuid, u64> {
    batch
        .iter()
        .map(|r| (r.message.id, r.sequence.unwrap_or(0)))
        .collect()
}

async fn stored(pool: &PgPool) -> anyhow::Result<BTreeMap<Uuid, Option<i64>>> {
    let rows: Vec<(Uuid, Option<i64>)> = sqlx::query_as(
        "SELECT id, seq FROM custody_outbox WHERE message_type <> 'custody.skipped'",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

async fn journal_rows(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM custody_sequence_block")
            .fetch_one(pool)
            .await?,
    )
}

fn acks(batch: &[OutboxRecord]) -> Vec<(i64, PublishAck)> {
    batch
        .iter()
        .map(|r| (r.position, PublishAck::default()))
        .collect()
}

#[tokio::test]
async fn numbers_outlive_a_relay_that_dies_before_marking() -> anyhow::Result<()> {
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let outbox = PgOutbox::new(pool.clone());
    let mut tx = pool.begin().await?;
    for n in 0..40 {
        outbox
            .enqueue(&mut tx, &msg("orders", &format!("k{}", n % 7), n))
            .await?;
    }
    tx.commit().await?;
    settle(&pool).await?;

    // r1 numbers everything (and, say, publishes it), then dies unmarked
    let t0 = Utc::now();
    let all = outbox.acquire_leases("r1", TTL, t0).await?;
    let mut first = outbox.fetch_batch(&all, 100, t0).await?;
    outbox.assign_sequences("r1", &mut first, t0).await?;
    assert_eq!(first.len(), 40);
    let given = numbers(&first);
    assert!(given.values().all(|s| *s > 0), "{given:?}");
    // the numbers are only in the journal so far, yet `custody trace` shows them
    assert!(stored(&pool).await?.values().all(Option::is_none));
    assert!(journal_rows(&pool).await? > 0);
    for r in &first {
        // `reconcile --live` resolves a missing number to its row
        let seq = r.sequence.unwrap_or(0);
        let found = outbox.numbered("orders", r.partition, &[seq]).await?;
        assert_eq!(
            found.iter().map(|n| (n.seq, n.id)).collect::<Vec<_>>(),
            vec![(seq, r.message.id)]
        );
        let st = custody_postgres::status(&pool, r.message.id).await?;
        let producer = st
            .producer
            .ok_or_else(|| anyhow::anyhow!("no outbox row"))?;
        assert_eq!(producer.sequence, r.sequence, "status of {}", r.message.id);
    }

    // r2 takes the partitions after r1's leases expired: same numbers
    let t1 = t0 + chrono::Duration::seconds(60);
    let r2 = PgOutbox::new(pool.clone());
    assert_eq!(r2.acquire_leases("r2", TTL, t1).await?, all);
    let mut again = r2.fetch_batch(&all, 100, t1).await?;
    r2.assign_sequences("r2", &mut again, t1).await?;
    assert_eq!(
        numbers(&again),
        given,
        "a new holder renumbered in-flight rows"
    );
    let next: Vec<i64> = sqlx::query_scalar("SELECT next_seq - 1 FROM custody_sequence")
        .fetch_all(&pool)
        .await?;
    assert_eq!(next.iter().sum::<i64>(), 40, "numbers were spent twice");

    // r1's late mark is fenced and copies nothing
    assert_eq!(outbox.mark_published("r1", &acks(&first), t1).await?, 0);
    assert!(stored(&pool).await?.values().all(Option::is_none));

    // r2: a first part marked, one failure, the rest marked, the failed one dead
    again.sort_by_key(|r| r.position);
    let (failed, rest) = again.split_at(1);
    let (part1, part2) = rest.split_at(20);
    assert_eq!(r2.mark_published("r2", &acks(part1), t1).await?, 20);
    let _ = r2
        .record_failure("r2", failed[0].position, "refused", t1, t1)
        .await?;
    assert_eq!(r2.mark_published("r2", &acks(part2), t1).await?, 19);
    let _ = r2
        .dead_letter("r2", failed[0].position, "refused for good", t1)
        .await?;
    let after = stored(&pool).await?;
    for (id, seq) in &given {
        assert_eq!(after[id], Some(*seq as i64), "number of {id} in its row");
    }
    // the dead one's skip marker carries its number
    let marker: i64 =
        sqlx::query_scalar("SELECT seq FROM custody_outbox WHERE message_type = 'custody.skipped'")
            .fetch_one(&pool)
            .await?;
    assert_eq!(Some(marker as u64), failed[0].sequence);

    // every journal row is copied now; a fresh handle sweeps them at its
    // first numbering
    let fresh = PgOutbox::new(pool.clone());
    let mut tx = pool.begin().await?;
    fresh.enqueue(&mut tx, &msg("orders", "k-late", 99)).await?;
    tx.commit().await?;
    settle(&pool).await?;
    let mut late = fresh.fetch_batch(&all, 100, t1).await?;
    // the marker and the new message
    assert_eq!(late.len(), 2, "{late:?}");
    fresh.assign_sequences("r2", &mut late, t1).await?;
    assert_eq!(
        journal_rows(&pool).await?,
        1,
        "only the new message's journal row is left"
    );
    Ok(())
}

#[tokio::test]
async fn a_redriven_dead_letter_gets_a_new_number_while_its_journal_row_remains(
) -> anyhow::Result<()> {
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let outbox = PgOutbox::new(pool.clone());
    let mut tx = pool.begin().await?;
    for n in 0..3 {
        outbox
            .enqueue(&mut tx, &msg("orders", "one-key", n))
            .await?;
    }
    tx.commit().await?;
    settle(&pool).await?;

    let t0 = Utc::now();
    let all = outbox.acquire_leases("r1", TTL, t0).await?;
    let mut batch = outbox.fetch_batch(&all, 10, t0).await?;
    outbox.assign_sequences("r1", &mut batch, t0).await?;
    let seqs: Vec<Option<u64>> = batch.iter().map(|r| r.sequence).collect();
    assert_eq!(seqs, vec![Some(1), Some(2), Some(3)]);
    // the second one is dead-lettered; nothing is marked, so the journal row
    // still holds all three numbers
    let _ = outbox
        .dead_letter("r1", batch[1].position, "bad", t0)
        .await?;
    assert_eq!(journal_rows(&pool).await?, 1);
    let dead = custody_postgres::dead_letter_rows(&pool).await?;
    assert_eq!(dead.len(), 1);
    let out = custody_postgres::redrive(&pool, &[dead[0].0], t0).await?;
    assert_eq!(out.to_relay, 1, "{out:?}");
    settle(&pool).await?;

    let mut next = outbox.fetch_batch(&all, 10, t0).await?;
    outbox.assign_sequences("r1", &mut next, t0).await?;
    let got: BTreeMap<Uuid, Option<u64>> =
        next.iter().map(|r| (r.message.id, r.sequence)).collect();
    assert_eq!(got.len(), 4, "three messages and the skip marker: {next:?}");
    assert_eq!(got[&batch[0].message.id], Some(1));
    assert_eq!(got[&batch[2].message.id], Some(3));
    // number 2 stays with the skip marker; the redriven message is new
    assert_eq!(got[&batch[1].message.id], Some(4));
    let marker = next
        .iter()
        .find(|r| r.message.message_type == "custody.skipped")
        .ok_or_else(|| anyhow::anyhow!("no skip marker"))?;
    assert_eq!(marker.sequence, Some(2));
    Ok(())
}
