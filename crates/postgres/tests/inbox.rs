//! The idempotent inbox.
#![allow(missing_docs)]

mod common;

use chrono::Utc;
use custody_core::{DeadLetter, InboxOutcome, InboxStore};
use custody_postgres::{dead_letters, PgInbox};

use common::{db, msg};

#[tokio::test]
async fn new_then_duplicate() -> anyhow::Result<()> {
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let inbox = PgInbox::new(pool.clone());
    let m = msg("orders", "k", 1);

    let mut tx = inbox.begin().await?;
    assert_eq!(
        inbox.record(&mut tx, "billing", &m, Utc::now()).await?,
        InboxOutcome::New
    );
    inbox.commit(tx).await?;

    let mut tx = inbox.begin().await?;
    assert_eq!(
        inbox.record(&mut tx, "billing", &m, Utc::now()).await?,
        InboxOutcome::Duplicate
    );
    inbox.commit(tx).await?;
    let dups: i32 =
        sqlx::query_scalar("SELECT duplicates FROM custody_inbox WHERE message_id = $1")
            .bind(m.id)
            .fetch_one(&pool)
            .await?;
    assert_eq!(dups, 1);

    // another consumer is independent
    let mut tx = inbox.begin().await?;
    assert_eq!(
        inbox.record(&mut tx, "shipping", &m, Utc::now()).await?,
        InboxOutcome::New
    );
    inbox.commit(tx).await?;
    Ok(())
}

#[tokio::test]
async fn rollback_leaves_no_row() -> anyhow::Result<()> {
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let inbox = PgInbox::new(pool.clone());
    let m = msg("orders", "k", 1);
    let mut tx = inbox.begin().await?;
    assert_eq!(
        inbox.record(&mut tx, "billing", &m, Utc::now()).await?,
        InboxOutcome::New
    );
    tx.rollback().await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM custody_inbox")
        .fetch_one(&pool)
        .await?;
    assert_eq!(rows, 0);
    let mut tx = inbox.begin().await?;
    assert_eq!(
        inbox.record(&mut tx, "billing", &m, Utc::now()).await?,
        InboxOutcome::New
    );
    inbox.commit(tx).await?;
    Ok(())
}

#[tokio::test]
async fn consumer_dead_letter_skips_redelivery() -> anyhow::Result<()> {
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let inbox = PgInbox::new(pool.clone());
    let m = msg("orders", "k", 1);
    let dead = DeadLetter {
        message_id: Some(m.id),
        origin: "ignored".to_owned(),
        topic: m.topic.clone(),
        key: Some(m.key.clone()),
        message_type: Some(m.message_type.clone()),
        payload: m.payload.clone(),
        envelope: Some(serde_json::to_string(&m)?),
        error: "handler failed permanently".to_owned(),
        attempts: 3,
        dead_at: Utc::now(),
    };
    inbox.dead_letter("billing", &dead).await?;
    let listed = dead_letters(&pool).await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].origin, "consumer:billing");
    assert_eq!(listed[0].attempts, 3);
    assert_eq!(listed[0].message_id, Some(m.id));
    let mut tx = inbox.begin().await?;
    assert_eq!(
        inbox.record(&mut tx, "billing", &m, Utc::now()).await?,
        InboxOutcome::Duplicate
    );
    inbox.commit(tx).await?;
    Ok(())
}

/// `record_all` (one round trip) gives the outcomes and leaves the rows that
/// `record` message by message gives: new, duplicate inside one call, a
/// numbered message compacted into its floor, a redriven row counting as
/// new once.
#[tokio::test]
async fn record_all_is_record_one_by_one() -> anyhow::Result<()> {
    use custody_core::{Message, Sequence};
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let inbox = PgInbox::new(pool.clone());
    let numbered = |n: u64, partition: u32, seq: u64| {
        let mut m = msg("orders", "k", n);
        Sequence {
            producer: "p1".into(),
            topic: "orders".into(),
            partition,
            seq,
        }
        .stamp(&mut m);
        m
    };
    let (m1, m2, m3, m4, m5) = (
        msg("orders", "k", 1),
        numbered(2, 0, 1),
        numbered(3, 0, 2),
        numbered(4, 1, 1),
        numbered(5, 0, 3),
    );
    let rounds: Vec<Vec<&Message>> = vec![
        vec![&m1, &m2, &m3, &m1, &m4],
        // m3 compacted into the floor (row gone, floor 2): still a duplicate
        vec![&m3, &m5],
        // m1 redriven (duplicates = -1): new once, then a duplicate again
        vec![&m1, &m1],
    ];
    let mut got = Vec::new();
    for (consumer, batched) in [("all", true), ("one", false)] {
        let mut outcomes = Vec::new();
        for (i, round) in rounds.iter().enumerate() {
            if i == 1 {
                // the real compaction: rows of 1..=2 fold into the floor
                let folded = inbox
                    .compact(consumer, Utc::now() + chrono::Duration::hours(1), 100)
                    .await?;
                assert!(folded.deleted >= 2, "compaction folded {folded:?}");
            }
            if i == 2 {
                sqlx::query("UPDATE custody_inbox SET duplicates = -1 WHERE consumer = $1 AND message_id = $2")
                    .bind(consumer)
                    .bind(m1.id)
                    .execute(&pool)
                    .await?;
            }
            let mut tx = inbox.begin().await?;
            if batched {
                outcomes.extend(
                    inbox
                        .record_all(&mut tx, consumer, round, Utc::now())
                        .await?,
                );
            } else {
                for m in round {
                    outcomes.push(inbox.record(&mut tx, consumer, m, Utc::now()).await?);
                }
            }
            inbox.commit(tx).await?;
        }
        let rows: Vec<(uuid::Uuid, i32, Option<i64>)> = sqlx::query_as(
            "SELECT message_id, duplicates, seq FROM custody_inbox WHERE consumer = $1 ORDER BY message_id",
        )
        .bind(consumer)
        .fetch_all(&pool)
        .await?;
        let floors: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT producer_partition, floor FROM custody_inbox_watermark WHERE consumer = $1 ORDER BY 1",
        )
        .bind(consumer)
        .fetch_all(&pool)
        .await?;
        got.push((outcomes, rows, floors));
    }
    use InboxOutcome::{Duplicate, New};
    assert_eq!(
        got[0].0,
        vec![New, New, New, Duplicate, New, Duplicate, New, New, Duplicate]
    );
    assert_eq!(got[0], got[1], "record_all and record disagree");
    Ok(())
}

#[tokio::test]
async fn accept_gap() -> anyhow::Result<()> {
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let inbox = PgInbox::new(pool.clone());
    let (consumer, expected) = custody_testkit::conformance::inbox::accept_gap_test(inbox, || {
        let pool = pool.clone();
        async move { Ok(dead_letters(&pool).await?) }
    })
    .await?;
    let audit: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT numbers, accepted_by, reason FROM custody_gap_accepted WHERE consumer = $1 ORDER BY id",
    )
    .bind(&consumer)
    .fetch_all(&pool)
    .await?;
    let got: Vec<(String, String)> = audit
        .iter()
        .map(|(n, b, _)| (n.clone(), b.clone()))
        .collect();
    assert_eq!(got, expected);
    assert!(audit.iter().all(|(_, _, why)| why.contains("max_age")));
    Ok(())
}

/// Scenario 3 under concurrency (READ COMMITTED): a copy and the redrive in
/// two open transactions, in both orders. Whichever takes the inbox row
/// first, the redrive is the one applied and the copy is a duplicate.
#[tokio::test]
async fn redrive_and_copy_race_in_both_orders() -> anyhow::Result<()> {
    use custody_core::{Message, Sequence};
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let inbox = PgInbox::new(pool.clone());
    for copy_first in [false, true] {
        let consumer = format!("billing_{copy_first}");
        let mut m: Message = msg("orders", "k", 1);
        Sequence {
            producer: "p".into(),
            topic: "orders".into(),
            partition: 0,
            seq: 1,
        }
        .stamp(&mut m);
        let dead = DeadLetter {
            message_id: Some(m.id),
            origin: String::new(),
            topic: m.topic.clone(),
            key: Some(m.key.clone()),
            message_type: Some(m.message_type.clone()),
            payload: m.payload.clone(),
            envelope: Some(serde_json::to_string(&m)?),
            error: "test".into(),
            attempts: 1,
            dead_at: Utc::now(),
        };
        inbox.dead_letter(&consumer, &dead).await?;
        let seqs: Vec<i64> = sqlx::query_scalar(
            "SELECT seq FROM custody_dead_letter WHERE message_id = $1 AND origin = $2",
        )
        .bind(m.id)
        .bind(format!("consumer:{consumer}"))
        .fetch_all(&pool)
        .await?;
        custody_postgres::redrive(&pool, &seqs, Utc::now()).await?;
        let queued = inbox.redrives(&consumer, 10).await?;
        assert_eq!(queued.len(), 1);
        let mut redriven = queued[0].message.clone();
        Sequence::unstamp(&mut redriven);

        let (first, second) = if copy_first {
            // the copy takes the row and holds it; the redrive waits for it
            let mut c = inbox.begin().await?;
            let copy = inbox.record(&mut c, &consumer, &m, Utc::now()).await?;
            let r_inbox = inbox.clone();
            let r_consumer = consumer.clone();
            let seq = queued[0].seq;
            let redrive = tokio::spawn(async move {
                let mut r = r_inbox.begin().await?;
                r_inbox.finish_redrive(&mut r, seq).await?;
                let out = r_inbox
                    .record(&mut r, &r_consumer, &redriven, Utc::now())
                    .await?;
                r_inbox.commit(r).await?;
                anyhow::Ok(out)
            });
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            inbox.commit(c).await?;
            (copy, redrive.await??)
        } else {
            // the redrive takes the row and holds it; the copy waits for it
            let mut r = inbox.begin().await?;
            inbox.finish_redrive(&mut r, queued[0].seq).await?;
            let out = inbox
                .record(&mut r, &consumer, &redriven, Utc::now())
                .await?;
            let c_inbox = inbox.clone();
            let c_consumer = consumer.clone();
            let copy = m.clone();
            let racing = tokio::spawn(async move {
                let mut c = c_inbox.begin().await?;
                let out = c_inbox
                    .record(&mut c, &c_consumer, &copy, Utc::now())
                    .await?;
                c_inbox.commit(c).await?;
                anyhow::Ok(out)
            });
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            inbox.commit(r).await?;
            (racing.await??, out)
        };
        assert_eq!(
            (first, second),
            (InboxOutcome::Duplicate, InboxOutcome::New),
            "copy first: {copy_first} (outcomes: copy, redrive)"
        );
        assert!(inbox.redrives(&consumer, 10).await?.is_empty());
    }
    Ok(())
}
