//! Conformance tests every [`InboxStore`] backend runs on its real database
//! (`pub async fn …_test(inbox, …)`, called from one test per backend).

use std::future::Future;

use anyhow::{ensure, Context};
use chrono::{Duration as ChronoDuration, Utc};
use custody_core::{DeadLetter, InboxOutcome, InboxStore, Message, Sequence};
use uuid::Uuid;

fn message(topic: &str, n: u64) -> anyhow::Result<Message> {
    Ok(Message::builder(topic, "k", "Numbered").json(&n)?.build()?)
}

fn dead_letter_of(message: &Message) -> anyhow::Result<DeadLetter> {
    Ok(DeadLetter {
        message_id: Some(message.id),
        origin: String::new(),
        topic: message.topic.clone(),
        key: Some(message.key.clone()),
        message_type: Some(message.message_type.clone()),
        payload: message.payload.to_vec(),
        envelope: Some(serde_json::to_string(message)?),
        error: "handler failed for good (test)".into(),
        attempts: 1,
        dead_at: Utc::now(),
    })
}

async fn record_one<I: InboxStore>(
    inbox: &I,
    consumer: &str,
    message: &Message,
) -> anyhow::Result<InboxOutcome> {
    let mut tx = inbox.begin().await?;
    let outcome = inbox.record(&mut tx, consumer, message, Utc::now()).await?;
    inbox.commit(tx).await?;
    Ok(outcome)
}

/// Scenario 3 of issue 11: the redrive row, locked and deleted in the
/// handler's transaction, is the one exactly-once token for a redrive.
///
/// A numbered message M is dead-lettered by the consumer and the floor moves
/// past it; an operator redrives it (`redrive(M's id)`: the backend's
/// `custody dlq redrive`). Before the consumer drains the redrive queue a
/// stamped copy of M arrives (a JetStream replay, a republish past the
/// dedupe window): it must be a duplicate and leave the redrive its token,
/// whether it comes alone or in a run ([`InboxStore::record_all`]), and
/// however often. A redrive whose transaction rolls back (its handler
/// failed) leaves the token too. The redrive itself is then new exactly
/// once, and nothing of M is left behind: no queue entry, no hole. The same
/// for an unnumbered message.
pub async fn redrive_is_the_only_token_test<I, F, Fut>(inbox: I, redrive: F) -> anyhow::Result<()>
where
    I: InboxStore,
    F: Fn(Uuid) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let consumer = crate::unique_name("billing");
    let topic = "orders";
    let producer = crate::unique_name("producer");
    let stamp = |m: &mut Message, seq: u64| {
        Sequence {
            producer: producer.clone(),
            topic: topic.to_owned(),
            partition: 0,
            seq,
        }
        .stamp(m)
    };
    let mut m1 = message(topic, 1)?;
    stamp(&mut m1, 1);
    let mut m2 = message(topic, 2)?;
    stamp(&mut m2, 2);
    let plain = message(topic, 3)?; // unnumbered

    // M (#1) is dead-lettered, #2 processed; compaction moves the floor to 2
    // (rows kept: they are younger than keep_after).
    inbox.dead_letter(&consumer, &dead_letter_of(&m1)?).await?;
    inbox
        .dead_letter(&consumer, &dead_letter_of(&plain)?)
        .await?;
    ensure!(record_one(&inbox, &consumer, &m2).await? == InboxOutcome::New);
    inbox
        .compact(&consumer, Utc::now() - ChronoDuration::hours(1), 100)
        .await?;
    let floor = |p: Vec<custody_core::PartitionProgress>| {
        p.into_iter()
            .find(|p| p.producer == producer)
            .map(|p| (p.floor, p.holes))
    };
    ensure!(
        floor(inbox.progress(&consumer).await?) == Some((2, 0)),
        "setup: the floor should be past the dead letter"
    );

    redrive(m1.id).await.context("redrive M")?;
    redrive(plain.id)
        .await
        .context("redrive the unnumbered one")?;
    let queued = inbox.redrives(&consumer, 10).await?;
    ensure!(
        queued.len() == 2,
        "two redrives queued, got {}",
        queued.len()
    );

    // Copies arrive before the queue is drained: alone, in a run, twice.
    for _ in 0..2 {
        ensure!(
            record_one(&inbox, &consumer, &m1).await? == InboxOutcome::Duplicate,
            "a stamped copy of a queued redrive must be a duplicate (it would use up the redrive)"
        );
        ensure!(
            record_one(&inbox, &consumer, &plain).await? == InboxOutcome::Duplicate,
            "a copy of a queued (unnumbered) redrive must be a duplicate"
        );
        let mut tx = inbox.begin().await?;
        let run = inbox
            .record_all(&mut tx, &consumer, &[&m2, &m1, &plain], Utc::now())
            .await?;
        inbox.commit(tx).await?;
        ensure!(
            run == vec![InboxOutcome::Duplicate; 3],
            "copies recorded in a run: {run:?}"
        );
    }

    // A redrive whose handler fails: its transaction rolls back, token kept.
    {
        let r = &queued[0];
        let mut unstamped = r.message.clone();
        Sequence::unstamp(&mut unstamped);
        let mut tx = inbox.begin().await?;
        inbox.finish_redrive(&mut tx, r.seq).await?;
        ensure!(
            inbox
                .record(&mut tx, &consumer, &unstamped, Utc::now())
                .await?
                == InboxOutcome::New,
            "the redrive is new in its own transaction"
        );
        drop(tx); // rolled back
    }
    ensure!(record_one(&inbox, &consumer, &m1).await? == InboxOutcome::Duplicate);

    // The consumer drains the queue as the engine does: the queue row
    // deleted, then the (unstamped) message recorded, in one transaction.
    let queued = inbox.redrives(&consumer, 10).await?;
    ensure!(queued.len() == 2, "still two redrives queued");
    for r in &queued {
        let mut unstamped = r.message.clone();
        Sequence::unstamp(&mut unstamped);
        let mut tx = inbox.begin().await?;
        inbox.finish_redrive(&mut tx, r.seq).await?;
        let outcome = inbox
            .record(&mut tx, &consumer, &unstamped, Utc::now())
            .await?;
        inbox.commit(tx).await?;
        ensure!(
            outcome == InboxOutcome::New,
            "the redrive of {} was not applied ({outcome:?}): the message is lost",
            r.message.id
        );
    }
    ensure!(inbox.redrives(&consumer, 10).await?.is_empty());

    // Afterwards every copy is a duplicate, and #1 is still accounted for.
    for m in [&m1, &plain, &m2] {
        ensure!(record_one(&inbox, &consumer, m).await? == InboxOutcome::Duplicate);
    }
    let mut unstamped = m1.clone();
    Sequence::unstamp(&mut unstamped);
    ensure!(record_one(&inbox, &consumer, &unstamped).await? == InboxOutcome::Duplicate);
    inbox
        .compact(&consumer, Utc::now() - ChronoDuration::hours(1), 100)
        .await?;
    ensure!(
        floor(inbox.progress(&consumer).await?) == Some((2, 0)),
        "#1 must stay accounted for (no hole)"
    );
    Ok(())
}
