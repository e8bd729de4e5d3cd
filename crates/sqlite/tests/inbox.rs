//! Idempotent inbox: duplicates, rollbacks, consumer dead letters.
mod common;

use chrono::Utc;
use common::{db, msg};
use custody_core::{DeadLetter, InboxOutcome, InboxStore};
use custody_sqlite::{dead_letters, SqliteInbox};

async fn inbox_rows(pool: &sqlx::SqlitePool) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(
        sqlx::query_as("SELECT message_id, duplicates FROM custody_inbox ORDER BY message_id")
            .fetch_all(pool)
            .await?,
    )
}

#[tokio::test]
async fn second_record_is_a_duplicate() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let inbox = SqliteInbox::new(pool.clone());
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

    assert_eq!(inbox_rows(&pool).await?, vec![(m.id.to_string(), 1)]);

    // Another consumer has its own inbox.
    let mut tx = inbox.begin().await?;
    assert_eq!(
        inbox.record(&mut tx, "shipping", &m, Utc::now()).await?,
        InboxOutcome::New
    );
    inbox.commit(tx).await?;
    Ok(())
}

#[tokio::test]
async fn rolled_back_record_leaves_no_row() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let inbox = SqliteInbox::new(pool.clone());
    let m = msg("orders", "k", 1);

    let mut tx = inbox.begin().await?;
    assert_eq!(
        inbox.record(&mut tx, "billing", &m, Utc::now()).await?,
        InboxOutcome::New
    );
    tx.rollback().await?;
    assert!(inbox_rows(&pool).await?.is_empty());

    // The redelivery is new again: the effect never happened.
    let mut tx = inbox.begin().await?;
    assert_eq!(
        inbox.record(&mut tx, "billing", &m, Utc::now()).await?,
        InboxOutcome::New
    );
    inbox.commit(tx).await?;
    assert_eq!(inbox_rows(&pool).await?, vec![(m.id.to_string(), 0)]);
    Ok(())
}

#[tokio::test]
async fn dead_letter_is_stored_and_redelivery_skipped() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let inbox = SqliteInbox::new(pool.clone());
    let m = msg("orders", "k", 1);
    let dead = DeadLetter {
        message_id: Some(m.id),
        origin: String::new(),
        topic: m.topic.clone(),
        key: Some(m.key.clone()),
        message_type: Some(m.message_type.clone()),
        payload: m.payload.clone(),
        envelope: Some(serde_json::to_string(&m)?),
        error: "permanent: amount is negative".into(),
        attempts: 3,
        dead_at: Utc::now(),
    };
    inbox.dead_letter("billing", &dead).await?;
    // Idempotent on the inbox side.
    inbox.dead_letter("billing", &dead).await?;

    let stored = dead_letters(&pool).await?;
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0].origin, "consumer:billing");
    assert_eq!(stored[0].message_id, Some(m.id));
    assert_eq!(stored[0].error, "permanent: amount is negative");
    assert_eq!(stored[0].attempts, 3);
    assert_eq!(stored[0].payload, m.payload);

    let mut tx = inbox.begin().await?;
    assert_eq!(
        inbox.record(&mut tx, "billing", &m, Utc::now()).await?,
        InboxOutcome::Duplicate
    );
    inbox.commit(tx).await?;

    // A message too broken to have an id: stored, no inbox row.
    let anonymous = DeadLetter {
        message_id: None,
        ..dead
    };
    inbox.dead_letter("billing", &anonymous).await?;
    assert_eq!(dead_letters(&pool).await?.len(), 3);
    assert_eq!(inbox_rows(&pool).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn accept_gap() -> anyhow::Result<()> {
    let (_dir, pool) = common::db().await?;
    let inbox = SqliteInbox::new(pool.clone());
    let (consumer, expected) = custody_testkit::conformance::inbox::accept_gap_test(inbox, || {
        let pool = pool.clone();
        async move { Ok(dead_letters(&pool).await?) }
    })
    .await?;
    let audit: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT numbers, accepted_by, reason FROM custody_gap_accepted WHERE consumer = ?1 ORDER BY id",
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
