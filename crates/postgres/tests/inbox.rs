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
