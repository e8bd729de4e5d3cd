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

fn numbered(topic: &str, producer: &str, partition: u32, seq: u64) -> anyhow::Result<Message> {
    let mut m = message(topic, seq)?;
    Sequence {
        producer: producer.to_owned(),
        topic: topic.to_owned(),
        partition,
        seq,
    }
    .stamp(&mut m);
    Ok(m)
}

/// `(floor, holes)` of one producer partition.
async fn floor_of<I: InboxStore>(
    inbox: &I,
    consumer: &str,
    producer: &str,
    partition: u32,
) -> anyhow::Result<Option<(u64, u64)>> {
    Ok(inbox
        .progress(consumer)
        .await?
        .into_iter()
        .find(|p| p.producer == producer && p.partition == partition)
        .map(|p| (p.floor, p.holes)))
}

/// Scenario 4 of issue 11: a numbered message at or below the floor whose id
/// the inbox never recorded (its producer's history forked and reused the
/// number) is never dropped silently: it is dead-lettered with the reason,
/// once however often it is replayed, and nothing of it counts as
/// processed. A replay of the message that had the number stays a plain
/// duplicate. Once compaction deleted the rows of a number (at or below
/// `forgotten`), the inbox can no longer tell the two apart and treats such
/// a message as a duplicate: the bound the docs state (`compact-keep`).
/// `dead_letters()` lists the backend's dead letters.
pub async fn unseen_number_is_dead_lettered_test<I, F, Fut>(
    inbox: I,
    dead_letters: F,
) -> anyhow::Result<()>
where
    I: InboxStore,
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<Vec<DeadLetter>>>,
{
    let consumer = crate::unique_name("billing");
    let producer = crate::unique_name("producer");
    let first: Vec<Message> = (1..=3)
        .map(|s| numbered("orders", &producer, 0, s))
        .collect::<anyhow::Result<_>>()?;
    for m in &first {
        ensure!(record_one(&inbox, &consumer, m).await? == InboxOutcome::New);
    }
    inbox
        .compact(&consumer, Utc::now() - ChronoDuration::hours(1), 100)
        .await?;
    ensure!(floor_of(&inbox, &consumer, &producer, 0).await? == Some((3, 0)));

    // Another message with number 2 (a restored producer gave it again).
    let forked = numbered("orders", &producer, 0, 2)?;
    for _ in 0..2 {
        ensure!(record_one(&inbox, &consumer, &forked).await? == InboxOutcome::Duplicate);
    }
    let dead = dead_letters().await?;
    let mine: Vec<&DeadLetter> = dead
        .iter()
        .filter(|d| d.message_id == Some(forked.id))
        .collect();
    ensure!(
        mine.len() == 1,
        "the message reusing number 2 must be dead-lettered exactly once, found {} dead letters for it: it was dropped silently",
        mine.len()
    );
    ensure!(
        mine[0].error.contains("never recorded") && mine[0].origin.starts_with("consumer:"),
        "reason: {}",
        mine[0].error
    );
    // a replay of the real number 2 is an ordinary duplicate
    ensure!(record_one(&inbox, &consumer, &first[1]).await? == InboxOutcome::Duplicate);
    ensure!(dead_letters().await?.len() == dead.len());
    // the same in a run of a group (InboxStore::record_all)
    let forked3 = numbered("orders", &producer, 0, 3)?;
    let mut tx = inbox.begin().await?;
    let run = inbox
        .record_all(
            &mut tx,
            &consumer,
            &[&first[0], &forked3, &forked],
            Utc::now(),
        )
        .await?;
    inbox.commit(tx).await?;
    ensure!(run == vec![InboxOutcome::Duplicate; 3], "{run:?}");
    let dead = dead_letters().await?;
    ensure!(
        dead.iter().filter(|d| d.message_id == Some(forked3.id)).count() == 1
            && dead.iter().filter(|d| d.message_id == Some(forked.id)).count() == 1,
        "a run must dead-letter the message reusing number 3 (once) and not letter number 2's again"
    );
    // the dead letter is redriven like any other: applied once
    // (covered by redrive_is_the_only_token_test); here: not processed
    ensure!(floor_of(&inbox, &consumer, &producer, 0).await? == Some((3, 0)));

    // Rows compacted away: the number is forgotten, a duplicate as before.
    inbox
        .compact(&consumer, Utc::now() + ChronoDuration::hours(1), 100)
        .await?;
    let late = numbered("orders", &producer, 0, 1)?;
    ensure!(record_one(&inbox, &consumer, &late).await? == InboxOutcome::Duplicate);
    ensure!(
        !dead_letters()
            .await?
            .iter()
            .any(|d| d.message_id == Some(late.id)),
        "at or below `forgotten` the inbox cannot tell: documented as a duplicate"
    );
    Ok(())
}

/// Scenario 5 of issue 11: accepting a gap. The floor moves past exactly the
/// named numbers (an acceptance that would swallow another missing number is
/// refused), the partition has no hole left, and a message of an accepted
/// number that arrives after all is dead-lettered, not dropped. A partition
/// with no history whose stream did not begin at 1 starts its floor below
/// the lowest number recorded ([`GapRange::StreamStart`](custody_core::sequence::GapRange::StreamStart)); one with history
/// refuses that. Returns the acceptances made, for the backend's test to
/// check its audit table: `(by, reason, numbers)`.
pub async fn accept_gap_test<I, F, Fut>(
    inbox: I,
    dead_letters: F,
) -> anyhow::Result<(String, Vec<(String, String)>)>
where
    I: InboxStore,
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<Vec<DeadLetter>>>,
{
    use custody_core::{GapAcceptance, GapRange};
    let consumer = crate::unique_name("billing");
    let producer = crate::unique_name("producer");
    for s in [1, 2, 5] {
        let m = numbered("orders", &producer, 0, s)?;
        ensure!(record_one(&inbox, &consumer, &m).await? == InboxOutcome::New);
    }
    let keep = Utc::now() - ChronoDuration::hours(1);
    inbox.compact(&consumer, keep, 100).await?;
    ensure!(floor_of(&inbox, &consumer, &producer, 0).await? == Some((2, 2)));
    let gap = |partition, range| GapAcceptance {
        producer: producer.clone(),
        topic: "orders".into(),
        partition,
        range,
        by: "ops@example".into(),
        reason: "stream max_age dropped them; re-entered by hand".into(),
    };
    let only_4 = inbox
        .accept_gap(
            &consumer,
            &gap(0, GapRange::Numbers { first: 4, last: 4 }),
            Utc::now(),
        )
        .await;
    ensure!(
        only_4
            .as_ref()
            .is_err_and(|e| e.to_string().contains("outside 4-4")),
        "accepting 4 alone would swallow 3: {only_4:?}"
    );
    let done = inbox
        .accept_gap(
            &consumer,
            &gap(0, GapRange::Numbers { first: 3, last: 4 }),
            Utc::now(),
        )
        .await?;
    ensure!((done.old_floor, done.new_floor, done.missing.clone()) == (2, 4, vec![(3, 4)]));
    inbox.compact(&consumer, keep, 100).await?;
    ensure!(floor_of(&inbox, &consumer, &producer, 0).await? == Some((5, 0)));
    let again = inbox
        .accept_gap(
            &consumer,
            &gap(0, GapRange::Numbers { first: 3, last: 4 }),
            Utc::now(),
        )
        .await;
    ensure!(again.is_err(), "already accepted: {again:?}");

    // number 3 arrives after all: not applied, not dropped
    let late = numbered("orders", &producer, 0, 3)?;
    ensure!(record_one(&inbox, &consumer, &late).await? == InboxOutcome::Duplicate);
    ensure!(
        dead_letters()
            .await?
            .iter()
            .any(|d| d.message_id == Some(late.id) && d.error.contains("accepted as lost")),
        "a message of an accepted number must be dead-lettered"
    );

    // A partition whose stream begins at 41.
    for s in [41, 43] {
        let m = numbered("orders", &producer, 1, s)?;
        ensure!(record_one(&inbox, &consumer, &m).await? == InboxOutcome::New);
    }
    let start = inbox
        .accept_gap(&consumer, &gap(1, GapRange::StreamStart), Utc::now())
        .await?;
    ensure!(start.new_floor == 40 && start.missing == vec![(1, 40)]);
    inbox.compact(&consumer, keep, 100).await?;
    ensure!(
        floor_of(&inbox, &consumer, &producer, 1).await? == Some((41, 1)),
        "42 is still a real gap"
    );
    let twice = inbox
        .accept_gap(&consumer, &gap(1, GapRange::StreamStart), Utc::now())
        .await;
    ensure!(
        twice.is_err(),
        "a partition with history has no stream start: {twice:?}"
    );
    let refused = inbox
        .accept_gap(&consumer, &gap(0, GapRange::StreamStart), Utc::now())
        .await;
    ensure!(refused.is_err(), "{refused:?}");
    let mut no_reason = gap(
        1,
        GapRange::Numbers {
            first: 42,
            last: 42,
        },
    );
    no_reason.reason = String::new();
    ensure!(inbox
        .accept_gap(&consumer, &no_reason, Utc::now())
        .await
        .is_err());
    Ok((
        consumer,
        vec![
            ("3-4".into(), "ops@example".into()),
            ("1-40".into(), "ops@example".into()),
        ],
    ))
}
