//! The consumer lease: one holder at a time, takeovers bump the epoch, and
//! the fence in an inbox transaction keeps a takeover out until it ends.
#![allow(missing_docs)]

mod common;

use std::time::Duration;

use chrono::Utc;
use custody_core::{ConsumerLeaseStore, InboxStore};
use custody_postgres::PgInbox;

use common::db;

const TTL: Duration = Duration::from_secs(30);

#[tokio::test]
async fn takeover_bumps_the_epoch_and_fences_the_old_holder() -> anyhow::Result<()> {
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let inbox = PgInbox::new(pool);
    let now = Utc::now();
    let a = inbox
        .acquire_consumer_lease("billing", "a", TTL, now)
        .await?
        .expect("free lease");
    assert_eq!(a.epoch, 1);
    assert!(inbox
        .acquire_consumer_lease("billing", "b", TTL, now)
        .await?
        .is_none());
    let mut tx = inbox.begin().await?;
    inbox.check_consumer_lease(&mut tx, &a).await?;
    inbox.commit(tx).await?;

    // a stalls past its lease: b takes over
    let later = now + chrono::Duration::seconds(31);
    let b = inbox
        .acquire_consumer_lease("billing", "b", TTL, later)
        .await?
        .expect("expired lease");
    assert_eq!(b.epoch, 2);
    let mut tx = inbox.begin().await?;
    let err = inbox
        .check_consumer_lease(&mut tx, &a)
        .await
        .expect_err("a is fenced off");
    assert!(!err.retryable());
    assert!(err.to_string().contains("b holds it at epoch 2"), "{err}");
    drop(tx);
    assert!(!inbox.renew_consumer_lease(&a, TTL, later).await?);

    // released: nobody passes the fence, the next taker gets a new epoch
    inbox.release_consumer_lease(&b).await?;
    let mut tx = inbox.begin().await?;
    assert!(inbox.check_consumer_lease(&mut tx, &b).await.is_err());
    drop(tx);
    let a2 = inbox
        .acquire_consumer_lease("billing", "a", TTL, later)
        .await?
        .expect("released lease");
    assert_eq!(a2.epoch, 3);
    Ok(())
}

#[tokio::test]
async fn a_takeover_waits_for_the_holders_open_transaction() -> anyhow::Result<()> {
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let inbox = PgInbox::new(pool);
    let now = Utc::now();
    let a = inbox
        .acquire_consumer_lease("billing", "a", TTL, now)
        .await?
        .expect("free lease");
    // a's inbox transaction passed the fence and is still open
    let mut tx = inbox.begin().await?;
    inbox.check_consumer_lease(&mut tx, &a).await?;

    let later = now + chrono::Duration::seconds(31);
    let other = inbox.clone();
    let takeover = tokio::spawn(async move {
        other
            .acquire_consumer_lease("billing", "b", TTL, later)
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !takeover.is_finished(),
        "the takeover must wait for the holder's transaction"
    );
    inbox.commit(tx).await?;
    let b = takeover.await??.expect("taken after the commit");
    assert_eq!(b.epoch, 2);
    Ok(())
}
