//! The consumer lease conformance suite ([`custody_core::lease`]): every
//! [`ConsumerLeaseStore`] runs these against its real database.

use std::time::Duration;

use chrono::Utc;
use custody_core::ConsumerLeaseStore;

const TTL: Duration = Duration::from_secs(30);

/// One holder at a time; a takeover after expiry bumps the epoch; the old
/// holder's fence then fails (not retryable) and its renewal is refused; a
/// released lease passes nobody's fence and the next taker gets a new epoch.
pub async fn takeover_bumps_the_epoch_and_fences_the_old_holder_test<I>(
    inbox: I,
) -> anyhow::Result<()>
where
    I: ConsumerLeaseStore,
{
    let now = Utc::now();
    let a = inbox
        .acquire_consumer_lease("billing", "a", TTL, now)
        .await?
        .ok_or_else(|| anyhow::anyhow!("a free lease must be taken"))?;
    anyhow::ensure!(a.epoch == 1, "first epoch is 1, got {}", a.epoch);
    anyhow::ensure!(
        inbox
            .acquire_consumer_lease("billing", "b", TTL, now)
            .await?
            .is_none(),
        "a held lease must not be taken"
    );
    let mut tx = inbox.begin().await?;
    inbox.check_consumer_lease(&mut tx, &a).await?;
    inbox.commit(tx).await?;

    // a stalls past its lease: b takes over
    let later = now + chrono::Duration::seconds(31);
    let b = inbox
        .acquire_consumer_lease("billing", "b", TTL, later)
        .await?
        .ok_or_else(|| anyhow::anyhow!("an expired lease must be taken"))?;
    anyhow::ensure!(b.epoch == 2, "takeover epoch is 2, got {}", b.epoch);
    let mut tx = inbox.begin().await?;
    match inbox.check_consumer_lease(&mut tx, &a).await {
        Ok(()) => anyhow::bail!("the old holder passed the fence after a takeover"),
        Err(err) => {
            anyhow::ensure!(!err.retryable(), "a lost lease is terminal: {err}");
            anyhow::ensure!(err.to_string().contains("b holds it at epoch 2"), "{err}");
        }
    }
    drop(tx);
    anyhow::ensure!(
        !inbox.renew_consumer_lease(&a, TTL, later).await?,
        "the old holder's renewal must be refused"
    );

    // released: nobody passes the fence, the next taker gets a new epoch
    inbox.release_consumer_lease(&b).await?;
    let mut tx = inbox.begin().await?;
    anyhow::ensure!(
        inbox.check_consumer_lease(&mut tx, &b).await.is_err(),
        "a released lease passes no fence"
    );
    drop(tx);
    let a2 = inbox
        .acquire_consumer_lease("billing", "a", TTL, later)
        .await?
        .ok_or_else(|| anyhow::anyhow!("a released lease must be taken"))?;
    anyhow::ensure!(a2.epoch == 3, "epoch after release is 3, got {}", a2.epoch);
    Ok(())
}

/// A takeover waits for the holder's open inbox transaction (which passed
/// the fence) and happens after it commits. `other` is a second handle on
/// the same database (its own pool, as another process would have).
pub async fn a_takeover_waits_for_the_holders_open_transaction_test<I>(
    inbox: I,
    other: I,
) -> anyhow::Result<()>
where
    I: ConsumerLeaseStore,
{
    let now = Utc::now();
    let a = inbox
        .acquire_consumer_lease("billing", "a", TTL, now)
        .await?
        .ok_or_else(|| anyhow::anyhow!("a free lease must be taken"))?;
    // a's inbox transaction passed the fence and is still open
    let mut tx = inbox.begin().await?;
    inbox.check_consumer_lease(&mut tx, &a).await?;

    let later = now + chrono::Duration::seconds(31);
    let takeover = tokio::spawn(async move {
        other
            .acquire_consumer_lease("billing", "b", TTL, later)
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    anyhow::ensure!(
        !takeover.is_finished(),
        "the takeover must wait for the holder's transaction"
    );
    inbox.commit(tx).await?;
    let b = takeover
        .await??
        .ok_or_else(|| anyhow::anyhow!("the lease must be taken after the commit"))?;
    anyhow::ensure!(b.epoch == 2, "takeover epoch is 2, got {}", b.epoch);
    Ok(())
}
