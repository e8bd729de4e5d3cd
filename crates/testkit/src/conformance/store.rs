//! The store scenarios: every [`StoreFixture`] runs each of these (through
//! [`crate::store_conformance!`]).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use chrono::{DateTime, SubsecRound, Utc};
use custody_core::{
    partition_for, Backoff, CircuitBreakerConfig, DeadLetter, InboxOutcome, InboxStore, Message,
    OutboxStore, PublishAck, RowWrite,
};
use custody_engine::{Consumer, ConsumerConfig, Relay, RelayConfig};
use uuid::Uuid;

use super::{applicable, Collect, Scenario, StoreFixture};
use crate::memory::{MemoryBroker, MemorySubscriber};

const TTL: Duration = Duration::from_secs(600);
/// How long a scenario waits for the engines to move everything.
const PATIENCE: Duration = Duration::from_secs(60);

/// A JSON message `n` on `topic` ordered by `key`; `created_at` cut to the
/// millisecond (the precision every store keeps).
pub fn message(topic: &str, key: &str, n: u64) -> anyhow::Result<Message> {
    Ok(Message::builder(topic, key, "Numbered")
        .created_at(Utc::now().trunc_subsecs(3))
        .json(&serde_json::json!({ "n": n }))?
        .build()?)
}

fn n_of(m: &Message) -> Option<u64> {
    m.decode_json::<serde_json::Value>().ok()?["n"].as_u64()
}

fn dead_letter_of(m: &Message, error: &str) -> anyhow::Result<DeadLetter> {
    Ok(DeadLetter {
        message_id: Some(m.id),
        origin: String::new(),
        topic: m.topic.clone(),
        key: Some(m.key.clone()),
        message_type: Some(m.message_type.clone()),
        payload: m.payload.to_vec(),
        envelope: Some(serde_json::to_string(m)?),
        error: error.to_owned(),
        attempts: 3,
        dead_at: Utc::now(),
    })
}

fn ids(messages: &[Message]) -> Vec<Uuid> {
    messages.iter().map(|m| m.id).collect()
}

fn all_partitions<O: OutboxStore>(outbox: &O) -> Vec<u32> {
    (0..outbox.partitions()).collect()
}

fn hours_ago(h: i64) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::hours(h)
}

/// A relay on `outbox` publishing to `broker`, with short backoff and breaker.
fn relay<O: OutboxStore>(outbox: O, broker: &MemoryBroker) -> Relay<O, MemoryBroker> {
    let config = RelayConfig {
        batch_size: 100,
        poll_interval: Duration::from_millis(20),
        backoff: Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_millis(50),
        },
        breaker: CircuitBreakerConfig {
            failure_threshold: 5,
            open_for: Duration::from_millis(100),
        },
        ..RelayConfig::default()
    };
    Relay::new(outbox, broker.clone(), config)
}

/// Step `relay` until `broker` holds `n` messages (or fail after [`PATIENCE`]).
async fn relay_until<O: OutboxStore>(
    relay: &mut Relay<O, MemoryBroker>,
    broker: &MemoryBroker,
    n: usize,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut last_error = None;
    while broker.stored().len() < n {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the relay published {} of {n} messages in {PATIENCE:?} (last error: {last_error:?})",
                broker.stored().len()
            );
        }
        match relay.step().await {
            Ok(0) => tokio::time::sleep(Duration::from_millis(10)).await,
            Ok(_) => {}
            Err(e) => {
                last_error = Some(e.to_string());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    Ok(())
}

/// Step `relay` until the outbox has nothing left to publish.
async fn relay_idle<O: OutboxStore>(
    relay: &mut Relay<O, MemoryBroker>,
    outbox: &O,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let all = all_partitions(outbox);
    loop {
        let _ = relay.step().await;
        if outbox.fetch_batch(&all, 1, Utc::now()).await?.is_empty() {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "pending rows left after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn consumer<I: InboxStore>(
    inbox: I,
    broker: &MemoryBroker,
    name: &str,
) -> Consumer<I, MemorySubscriber, Collect>
where
    Collect: custody_core::Handler<I::Tx>,
{
    consumer_on(inbox, broker.subscribe(name), name)
}

/// Consumer `name` reading `subscriber` (whose broker subscription may have
/// another name: a replay of everything).
fn consumer_on<I: InboxStore>(
    inbox: I,
    subscriber: MemorySubscriber,
    name: &str,
) -> Consumer<I, MemorySubscriber, Collect>
where
    Collect: custody_core::Handler<I::Tx>,
{
    let mut config = ConsumerConfig::new(name);
    config.fetch_wait = Duration::from_millis(20);
    Consumer::new(inbox, subscriber, Collect::default(), config)
}

async fn consume_all<I: InboxStore>(
    c: &mut Consumer<I, MemorySubscriber, Collect>,
) -> anyhow::Result<()>
where
    Collect: custody_core::Handler<I::Tx>,
{
    while c.run_once().await? > 0 {}
    Ok(())
}

async fn record_one<I: InboxStore>(
    inbox: &I,
    consumer: &str,
    m: &Message,
) -> anyhow::Result<InboxOutcome> {
    let mut tx = inbox.begin().await?;
    let outcome = inbox.record(&mut tx, consumer, m, Utc::now()).await?;
    inbox.commit(tx).await?;
    Ok(outcome)
}

/// Each `(id, topic, key, type, payload)` of `got` is the one of `sent`, in
/// order (the relay may add sequence headers; nothing else changes).
fn same_messages(got: &[Message], sent: &[Message]) -> anyhow::Result<()> {
    ensure!(
        ids(got) == ids(sent),
        "got {:?}, sent {:?}",
        ids(got),
        ids(sent)
    );
    for (g, s) in got.iter().zip(sent) {
        ensure!(
            (&g.topic, &g.key, &g.message_type, &g.payload)
                == (&s.topic, &s.key, &s.message_type, &s.payload),
            "message {} changed on the way: {g:?} vs {s:?}",
            s.id
        );
    }
    Ok(())
}

/// Enqueue → relay → consume through the real engines: a rolled-back
/// transaction sends nothing (no phantom), every committed message reaches
/// the handler exactly once and unchanged, per key in commit order, and
/// the outbox is left with nothing pending.
pub async fn enqueue_relay_consume_test<F: StoreFixture>(f: F) -> anyhow::Result<()>
where
    Collect: custody_core::Handler<<F::Inbox as InboxStore>::Tx>,
{
    let phantom = message("orders", "a", 0)?;
    f.enqueue(std::slice::from_ref(&phantom), false).await?;
    let first = vec![
        message("orders", "a", 1)?,
        message("orders", "b", 1)?,
        message("orders", "a", 2)?,
    ];
    f.enqueue(&first, true).await?;
    let second = vec![message("orders", "b", 2)?];
    f.enqueue(&second, true).await?;
    let sent: Vec<Message> = first.into_iter().chain(second).collect();

    let broker = MemoryBroker::default();
    let outbox = f.outbox();
    let mut r = relay(outbox.clone(), &broker);
    relay_until(&mut r, &broker, sent.len()).await?;
    relay_idle(&mut r, &outbox).await?;
    let stored = broker.stored();
    ensure!(
        !ids(&stored).contains(&phantom.id),
        "a rolled-back message was published"
    );
    ensure!(
        stored.len() == sent.len(),
        "published {} for {} committed",
        stored.len(),
        sent.len()
    );
    for key in ["a", "b"] {
        let of_key = |ms: &[Message]| -> Vec<Uuid> {
            ms.iter().filter(|m| m.key == key).map(|m| m.id).collect()
        };
        ensure!(
            of_key(&stored) == of_key(&sent),
            "key {key} published out of commit order"
        );
    }

    let mut c = consumer(f.inbox(), &broker, "billing");
    consume_all(&mut c).await?;
    same_messages(&c.handler().seen(), &stored)?;
    ensure!(c.stats().processed == sent.len() as u64, "{:?}", c.stats());
    ensure!(c.stats().duplicates == 0, "{:?}", c.stats());
    Ok(())
}

/// A rolled-back enqueue leaves no outbox row; a rolled-back inbox record
/// leaves no inbox row (the redelivery is new again).
pub async fn rollback_leaves_nothing_test<F: StoreFixture>(f: F) -> anyhow::Result<()> {
    let outbox = f.outbox();
    f.enqueue(
        &[message("orders", "k", 1)?, message("orders", "j", 2)?],
        false,
    )
    .await?;
    ensure!(
        f.outbox_positions().await?.is_empty(),
        "a rolled-back enqueue left rows"
    );
    ensure!(outbox
        .fetch_batch(&all_partitions(&outbox), 10, Utc::now())
        .await?
        .is_empty());
    let committed = f.enqueue(&[message("orders", "k", 3)?], true).await?;
    ensure!(
        f.outbox_positions().await? == committed,
        "exactly the committed row"
    );

    let inbox = f.inbox();
    let m = message("orders", "k", 1)?;
    let mut tx = inbox.begin().await?;
    ensure!(inbox.record(&mut tx, "billing", &m, Utc::now()).await? == InboxOutcome::New);
    drop(tx); // rolled back
    ensure!(
        !inbox.is_recorded("billing", m.id).await?,
        "a rolled-back record left a row"
    );
    ensure!(
        record_one(&inbox, "billing", &m).await? == InboxOutcome::New,
        "the redelivery after a rollback must be new: the effect never happened"
    );
    ensure!(inbox.is_recorded("billing", m.id).await?);
    Ok(())
}

/// A second record is a duplicate (per consumer); `record_all` gives what
/// one-by-one records give; through the engine, a redelivered copy reaches
/// the handler once and is counted as a duplicate.
pub async fn redelivery_is_a_duplicate_test<F: StoreFixture>(f: F) -> anyhow::Result<()>
where
    Collect: custody_core::Handler<<F::Inbox as InboxStore>::Tx>,
{
    let inbox = f.inbox();
    let m = message("orders", "k", 1)?;
    ensure!(record_one(&inbox, "billing", &m).await? == InboxOutcome::New);
    ensure!(record_one(&inbox, "billing", &m).await? == InboxOutcome::Duplicate);
    ensure!(
        record_one(&inbox, "shipping", &m).await? == InboxOutcome::New,
        "another consumer has its own inbox"
    );

    let (m1, m2) = (message("orders", "k", 2)?, message("orders", "k", 3)?);
    let mut tx = inbox.begin().await?;
    let outcomes = inbox
        .record_all(&mut tx, "all", &[&m1, &m2, &m1], Utc::now())
        .await?;
    inbox.commit(tx).await?;
    use InboxOutcome::{Duplicate, New};
    ensure!(outcomes == vec![New, New, Duplicate], "{outcomes:?}");

    let sent = vec![
        message("orders", "a", 1)?,
        message("orders", "a", 2)?,
        message("orders", "b", 1)?,
    ];
    f.enqueue(&sent, true).await?;
    let broker = MemoryBroker::default();
    let mut r = relay(f.outbox(), &broker);
    relay_until(&mut r, &broker, sent.len()).await?;
    ensure!(broker.duplicate(0) && broker.duplicate(2));
    let mut c = consumer(f.inbox(), &broker, "redelivered");
    consume_all(&mut c).await?;
    let seen = c.handler().seen();
    ensure!(
        seen.len() == 3,
        "applied {} times for 3 messages",
        seen.len()
    );
    ensure!(ids(&seen).into_iter().collect::<HashSet<_>>().len() == 3);
    ensure!(c.stats().duplicates == 2, "{:?}", c.stats());

    // the whole stream delivered again (a replay from the start) applies nothing
    let mut again = consumer_on(f.inbox(), broker.subscribe("replay"), "redelivered");
    consume_all(&mut again).await?;
    ensure!(
        again.handler().seen().is_empty(),
        "a replay was applied again"
    );
    ensure!(again.stats().duplicates == 5, "{:?}", again.stats());
    Ok(())
}

/// Several producers enqueue on the same keys concurrently, each message
/// in its own transaction, while the relay runs: every message is
/// published and applied once, and each producer's messages of a key in
/// the order it committed them.
pub async fn per_key_order_under_concurrency_test<F: StoreFixture>(f: F) -> anyhow::Result<()>
where
    Collect: custody_core::Handler<<F::Inbox as InboxStore>::Tx>,
{
    const PRODUCERS: u64 = 4;
    const EACH: u64 = 20;
    let f = Arc::new(f);
    let mut producers = tokio::task::JoinSet::new();
    for p in 0..PRODUCERS {
        let f = Arc::clone(&f);
        producers.spawn(async move {
            for n in 0..EACH {
                let m = Message::builder("orders", format!("k{}", n % 3), "Numbered")
                    .created_at(Utc::now().trunc_subsecs(3))
                    .json(&serde_json::json!({ "producer": p, "n": n }))?
                    .build()?;
                f.enqueue(&[m], true).await?;
            }
            anyhow::Ok(())
        });
    }
    let broker = MemoryBroker::default();
    let outbox = f.outbox();
    let mut r = relay(outbox.clone(), &broker);
    while !producers.is_empty() {
        let _ = r.step().await;
        while let Some(done) = producers.try_join_next() {
            done.context("producer task")??;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let total = (PRODUCERS * EACH) as usize;
    relay_until(&mut r, &broker, total).await?;
    relay_idle(&mut r, &outbox).await?;
    ensure!(
        broker.stored().len() == total,
        "published {}",
        broker.stored().len()
    );

    let mut c = consumer(f.inbox(), &broker, "billing");
    consume_all(&mut c).await?;
    let seen = c.handler().seen();
    ensure!(seen.len() == total, "applied {} of {total}", seen.len());
    let mut last: BTreeMap<(u64, String), u64> = BTreeMap::new();
    for m in &seen {
        let v: serde_json::Value = m.decode_json()?;
        let (p, n) = (
            v["producer"].as_u64().unwrap_or(u64::MAX),
            v["n"].as_u64().unwrap_or(u64::MAX),
        );
        if let Some(prev) = last.insert((p, m.key.clone()), n) {
            ensure!(
                prev < n,
                "producer {p} key {}: {n} applied after {prev}",
                m.key
            );
        }
    }
    Ok(())
}

/// The transport goes down while messages wait: nothing is lost, nothing
/// published twice, and everything goes out once it is back.
pub async fn transport_outage_and_recovery_test<F: StoreFixture>(f: F) -> anyhow::Result<()>
where
    Collect: custody_core::Handler<<F::Inbox as InboxStore>::Tx>,
{
    let sent: Vec<Message> = (0..5)
        .map(|n| message("orders", &format!("k{}", n % 2), n))
        .collect::<anyhow::Result<_>>()?;
    f.enqueue(&sent, true).await?;
    let broker = MemoryBroker::default();
    broker.set_down(true);
    let outbox = f.outbox();
    let mut r = relay(outbox.clone(), &broker);
    for _ in 0..5 {
        let _ = r.step().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ensure!(broker.is_empty(), "published while the broker was down");
    ensure!(
        f.outbox_dead_letters().await? == 0,
        "an outage must not dead-letter"
    );
    broker.set_down(false);
    relay_until(&mut r, &broker, sent.len()).await?;
    relay_idle(&mut r, &outbox).await?;
    ensure!(broker.stored().len() == sent.len());
    let mut c = consumer(f.inbox(), &broker, "billing");
    consume_all(&mut c).await?;
    let seen = c.handler().seen();
    ensure!(
        ids(&seen).into_iter().collect::<BTreeSet<_>>()
            == ids(&sent).into_iter().collect::<BTreeSet<_>>(),
        "every message once after the outage"
    );
    ensure!(seen.len() == sent.len());
    Ok(())
}

/// The store goes down under the relay (writes fail) and comes back:
/// nothing is lost or applied twice, and nothing stays pending.
pub async fn store_outage_and_recovery_test<F: StoreFixture>(f: F) -> anyhow::Result<()>
where
    Collect: custody_core::Handler<<F::Inbox as InboxStore>::Tx>,
{
    if !applicable(&f, Scenario::StoreOutage) {
        return Ok(());
    }
    let before = vec![message("orders", "a", 1)?, message("orders", "b", 1)?];
    f.enqueue(&before, true).await?;
    let broker = MemoryBroker::default();
    let outbox = f.outbox();
    let mut r = relay(outbox.clone(), &broker);
    relay_until(&mut r, &broker, before.len()).await?;
    relay_idle(&mut r, &outbox).await?;

    let during = vec![message("orders", "a", 2)?, message("orders", "b", 2)?];
    f.enqueue(&during, true).await?;
    f.set_store_down(true).await?;
    ensure!(
        outbox
            .acquire_leases("probe", TTL, Utc::now())
            .await
            .is_err(),
        "the fixture's outage must make store writes fail"
    );
    // a step during the outage fails (or finds nothing it can write)
    let _ = r.step().await;
    f.set_store_down(false).await?;
    let total = before.len() + during.len();
    relay_until(&mut r, &broker, total).await?;
    relay_idle(&mut r, &outbox).await?;
    ensure!(
        broker.stored().len() == total,
        "published {}",
        broker.stored().len()
    );
    let mut c = consumer(f.inbox(), &broker, "billing");
    consume_all(&mut c).await?;
    let seen = c.handler().seen();
    ensure!(seen.len() == total, "applied {} of {total}", seen.len());
    ensure!(ids(&seen).into_iter().collect::<HashSet<_>>().len() == total);
    Ok(())
}

/// Store-level dead letters. The relay's: the row leaves the pending set,
/// its key flows on, a second dead-lettering finds it not pending. The
/// consumer's: stored, idempotent, and the message's redelivery skipped.
pub async fn dead_letters_test<F: StoreFixture>(f: F) -> anyhow::Result<()> {
    let outbox = f.outbox();
    let rows = f
        .enqueue(
            &[
                message("orders", "a", 1)?,
                message("orders", "a", 2)?,
                message("orders", "b", 1)?,
            ],
            true,
        )
        .await?;
    let all = all_partitions(&outbox);
    outbox.acquire_leases("r", TTL, Utc::now()).await?;
    ensure!(
        outbox
            .dead_letter("r", rows[0], "poison", Utc::now())
            .await?
            == RowWrite::Written
    );
    let left: Vec<i64> = outbox
        .fetch_batch(&all, 10, Utc::now())
        .await?
        .iter()
        .map(|r| r.position)
        .collect();
    ensure!(
        left == rows[1..],
        "the dead row must leave and its key flow on: {left:?}"
    );
    ensure!(f.outbox_dead_letters().await? == 1);
    ensure!(
        outbox
            .dead_letter("r", rows[0], "again", Utc::now())
            .await?
            == RowWrite::NotPending
    );
    ensure!(f.outbox_dead_letters().await? == 1);

    let inbox = f.inbox();
    let m = message("orders", "k", 1)?;
    let dead = dead_letter_of(&m, "permanent: amount is negative")?;
    inbox.dead_letter("billing", &dead).await?;
    // idempotent on the inbox side
    inbox.dead_letter("billing", &dead).await?;
    let stored = f.inbox_dead_letters().await?;
    let mine: Vec<&DeadLetter> = stored
        .iter()
        .filter(|d| d.message_id == Some(m.id))
        .collect();
    ensure!(mine.len() == 2, "{stored:?}");
    ensure!(mine[0].origin == "consumer:billing", "{:?}", mine[0].origin);
    ensure!(mine[0].error == "permanent: amount is negative");
    ensure!(mine[0].attempts == 3);
    ensure!(mine[0].payload == m.payload);
    ensure!(inbox.is_recorded("billing", m.id).await?);
    ensure!(
        record_one(&inbox, "billing", &m).await? == InboxOutcome::Duplicate,
        "the redelivery of a dead-lettered message is skipped"
    );
    // a message too broken to have an id: stored, no inbox row
    let anonymous = DeadLetter {
        message_id: None,
        ..dead
    };
    inbox.dead_letter("billing", &anonymous).await?;
    ensure!(f.inbox_dead_letters().await?.len() == stored.len() + 1);
    Ok(())
}

/// The redrive queue: a redriven dead letter comes back through
/// `redrives`, is new exactly once after `finish_redrive`, and leaves the
/// queue.
pub async fn redrive_queue_test<F: StoreFixture>(f: F) -> anyhow::Result<()> {
    if !applicable(&f, Scenario::RedriveQueue) {
        return Ok(());
    }
    let inbox = f.inbox();
    let m = message("orders", "k", 1)?;
    inbox
        .dead_letter("billing", &dead_letter_of(&m, "failed (test)")?)
        .await?;
    ensure!(inbox.redrives("billing", 10).await?.is_empty());
    f.redrive(m.id).await?;
    let queue = inbox.redrives("billing", 10).await?;
    ensure!(queue.len() == 1, "{queue:?}");
    ensure!(queue[0].message.id == m.id);
    ensure!(inbox.redrives("shipping", 10).await?.is_empty());
    let mut tx = inbox.begin().await?;
    inbox.finish_redrive(&mut tx, queue[0].seq).await?;
    ensure!(inbox.record(&mut tx, "billing", &m, Utc::now()).await? == InboxOutcome::New);
    inbox.commit(tx).await?;
    ensure!(inbox.redrives("billing", 10).await?.is_empty());
    ensure!(record_one(&inbox, "billing", &m).await? == InboxOutcome::Duplicate);
    Ok(())
}

/// [`super::inbox::redrive_is_the_only_token_test`] on the fixture.
pub async fn redrive_is_the_only_token_test<F: StoreFixture>(f: F) -> anyhow::Result<()> {
    if !applicable(&f, Scenario::RedriveQueue) || !applicable(&f, Scenario::Sequences) {
        return Ok(());
    }
    super::inbox::redrive_is_the_only_token_test(f.inbox(), |id| f.redrive(id)).await
}

/// [`super::inbox::unseen_number_is_dead_lettered_test`] on the fixture.
pub async fn unseen_number_is_dead_lettered_test<F: StoreFixture>(f: F) -> anyhow::Result<()> {
    if !applicable(&f, Scenario::Sequences) {
        return Ok(());
    }
    super::inbox::unseen_number_is_dead_lettered_test(f.inbox(), || f.inbox_dead_letters()).await
}

/// Mark `positions` published at `at` (the relay's own write, with a lease).
async fn publish_at<O: OutboxStore>(
    outbox: &O,
    positions: &[i64],
    at: DateTime<Utc>,
) -> anyhow::Result<()> {
    outbox.acquire_leases("r", TTL, Utc::now()).await?;
    let acked: Vec<(i64, PublishAck)> = positions
        .iter()
        .map(|p| (*p, PublishAck::default()))
        .collect();
    let n = outbox.mark_published("r", &acked, at).await?;
    ensure!(n as usize == positions.len(), "not all rows were marked");
    Ok(())
}

async fn enqueue_keys<F: StoreFixture>(f: &F, keys: &[&str]) -> anyhow::Result<Vec<i64>> {
    let messages: Vec<Message> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| message("orders", k, i as u64))
        .collect::<anyhow::Result<_>>()?;
    f.enqueue(&messages, true).await
}

/// Prune never deletes a pending row, parked or not.
pub async fn pending_rows_are_never_pruned_test<F: StoreFixture>(f: F) -> anyhow::Result<()> {
    if !applicable(&f, Scenario::Prune) {
        return Ok(());
    }
    let outbox = f.outbox();
    let all = all_partitions(&outbox);
    let pending = enqueue_keys(&f, &["a", "b", "c"]).await?;
    // a parked pending row (failed once) is still pending
    outbox.acquire_leases("r", TTL, Utc::now()).await?;
    let parked = outbox
        .record_failure(
            "r",
            pending[0],
            "down",
            Utc::now() + chrono::Duration::hours(1),
            Utc::now(),
        )
        .await?;
    ensure!(parked == RowWrite::Written);
    let far_future = Utc::now() + chrono::Duration::days(365);
    ensure!(outbox.prune(&all, far_future, 1000).await? == 0);
    ensure!(f.outbox_positions().await? == pending);
    Ok(())
}

/// Old published rows go in batches of `limit`; newer ones, dead ones
/// younger than the cutoff and pending ones stay; a dead row counts from
/// its enqueue time and its dead letter outlives the prune.
pub async fn old_published_and_dead_rows_go_in_batches_test<F: StoreFixture>(
    f: F,
) -> anyhow::Result<()> {
    if !applicable(&f, Scenario::Prune) {
        return Ok(());
    }
    let outbox = f.outbox();
    let all = all_partitions(&outbox);
    let old = enqueue_keys(&f, &["a"; 10]).await?;
    let recent = enqueue_keys(&f, &["b"; 3]).await?;
    let dead = enqueue_keys(&f, &["c"]).await?;
    let pending = enqueue_keys(&f, &["d"]).await?;
    publish_at(&outbox, &old, hours_ago(48)).await?;
    publish_at(&outbox, &recent, Utc::now()).await?;
    ensure!(
        outbox
            .dead_letter("r", dead[0], "poison", Utc::now())
            .await?
            == RowWrite::Written
    );

    let cutoff = hours_ago(24);
    ensure!(outbox.prune(&all, cutoff, 4).await? == 4);
    ensure!(outbox.prune(&all, cutoff, 4).await? == 4);
    ensure!(outbox.prune(&all, cutoff, 4).await? == 2);
    ensure!(outbox.prune(&all, cutoff, 4).await? == 0);
    let mut kept = recent.clone();
    kept.extend(&dead);
    kept.extend(&pending);
    ensure!(
        f.outbox_positions().await? == kept,
        "only the old published rows go"
    );

    let later = Utc::now() + chrono::Duration::minutes(1);
    ensure!(outbox.prune(&all, later, 100).await? == 4);
    ensure!(f.outbox_positions().await? == pending);
    ensure!(f.outbox_dead_letters().await? == 1, "the dead letter stays");
    Ok(())
}

/// Prune touches only the partitions it is given (none: nothing).
pub async fn prune_touches_only_the_given_partitions_test<F: StoreFixture>(
    f: F,
) -> anyhow::Result<()> {
    if !applicable(&f, Scenario::Prune) {
        return Ok(());
    }
    let outbox = f.outbox();
    let n = outbox.partitions();
    let a = "key-a";
    let Some(b) = (0..100)
        .map(|i| format!("key-{i}"))
        .find(|k| partition_for(k, n) != partition_for(a, n))
    else {
        bail!("no key in another partition than {a:?} among {n} partitions");
    };
    let rows_a = enqueue_keys(&f, &[a, a]).await?;
    let rows_b = enqueue_keys(&f, &[&b, &b]).await?;
    let both: Vec<i64> = rows_a.iter().chain(&rows_b).copied().collect();
    publish_at(&outbox, &both, hours_ago(48)).await?;
    ensure!(
        outbox
            .prune(&[partition_for(&b, n)], hours_ago(24), 100)
            .await?
            == 2
    );
    ensure!(f.outbox_positions().await? == rows_a);
    ensure!(outbox.prune(&[], hours_ago(24), 100).await? == 0);
    ensure!(f.outbox_positions().await? == rows_a);
    Ok(())
}

/// Prune keeps every row the slowest embedded reader has not read; a
/// reader without a checkpoint does not hold pruning back.
pub async fn prune_keeps_rows_an_embedded_reader_has_not_read_test<F: StoreFixture>(
    f: F,
) -> anyhow::Result<()> {
    if !applicable(&f, Scenario::PruneEmbeddedReader) {
        return Ok(());
    }
    let outbox = f.outbox();
    let all = all_partitions(&outbox);
    let rows = enqueue_keys(&f, &["a"; 6]).await?;
    publish_at(&outbox, &rows, hours_ago(48)).await?;
    f.settle().await?;

    // a real reader reads and acknowledges the first two
    let read = f.read_and_ack("slow", 2).await?;
    ensure!(read == rows[..2], "the reader read {read:?}");
    f.set_checkpoint("fast", rows[4]).await?;
    ensure!(outbox.prune(&all, hours_ago(24), 100).await? == 2);
    ensure!(f.outbox_positions().await? == rows[2..]);

    f.set_checkpoint("slow", rows[5]).await?;
    // now "fast" (at rows[4]) is the slowest
    ensure!(outbox.prune(&all, hours_ago(24), 100).await? == 3);
    ensure!(f.outbox_positions().await? == rows[5..]);
    Ok(())
}

/// Numbering: the producer id is stable; each partition's records are
/// numbered 1, 2, … in position order, a second call continues where the
/// first stopped, and a relay without the lease numbers nothing (its
/// records are removed).
pub async fn sequences_per_partition_under_the_lease_test<F: StoreFixture>(
    f: F,
) -> anyhow::Result<()> {
    if !applicable(&f, Scenario::Sequences) {
        return Ok(());
    }
    let outbox = f.outbox();
    let all = all_partitions(&outbox);
    let producer = outbox.producer_id().await?;
    ensure!(producer.is_some(), "a numbering store has a producer id");
    ensure!(outbox.producer_id().await? == producer, "stable");
    ensure!(f.outbox().producer_id().await? == producer, "per database");

    let keys: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    let batch = |from: u64| -> anyhow::Result<Vec<Message>> {
        (from..from + 12)
            .map(|i| message("orders", &keys[(i % 6) as usize], i))
            .collect()
    };
    f.enqueue(&batch(0)?, true).await?;
    outbox.acquire_leases("r", TTL, Utc::now()).await?;
    let mut next: BTreeMap<u32, u64> = BTreeMap::new();
    for round in 0..2u64 {
        if round == 1 {
            f.enqueue(&batch(12)?, true).await?;
        }
        let mut records = outbox.fetch_batch(&all, 100, Utc::now()).await?;
        records.retain(|r| r.sequence.is_none());
        ensure!(
            records.len() == 12,
            "round {round}: {} records",
            records.len()
        );
        outbox
            .assign_sequences("r", &mut records, Utc::now())
            .await?;
        ensure!(records.len() == 12, "the lease holder keeps its records");
        records.sort_by_key(|r| r.position);
        for r in &records {
            let want = next.entry(r.partition).or_insert(1);
            ensure!(
                r.sequence == Some(*want),
                "partition {} position {}: {:?}, want {want}",
                r.partition,
                r.position,
                r.sequence
            );
            *want += 1;
        }
        // the numbers are kept (in the rows or a journal): numbering the
        // same rows again gives each the number it got
        let mut again = outbox.fetch_batch(&all, 100, Utc::now()).await?;
        outbox.assign_sequences("r", &mut again, Utc::now()).await?;
        for r in &records {
            let stored = again.iter().find(|a| a.position == r.position);
            ensure!(
                stored.map(|s| s.sequence) == Some(r.sequence),
                "number of {} not kept",
                r.position
            );
        }
        let acked: Vec<(i64, PublishAck)> = records
            .iter()
            .map(|r| (r.position, PublishAck::default()))
            .collect();
        ensure!(outbox.mark_published("r", &acked, Utc::now()).await? == 12);
    }

    f.enqueue(&batch(24)?, true).await?;
    let mut records = outbox.fetch_batch(&all, 100, Utc::now()).await?;
    ensure!(records.len() == 12);
    outbox
        .assign_sequences("not-the-holder", &mut records, Utc::now())
        .await?;
    ensure!(
        records.is_empty(),
        "a relay without the lease kept {} records",
        records.len()
    );
    let mut unnumbered = outbox.fetch_batch(&all, 100, Utc::now()).await?;
    ensure!(
        unnumbered.iter().all(|r| r.sequence.is_none()),
        "a relay without the lease numbered rows"
    );
    // and it used up no numbers: the holder goes on where it stopped
    outbox
        .assign_sequences("r", &mut unnumbered, Utc::now())
        .await?;
    unnumbered.sort_by_key(|r| r.position);
    for r in &unnumbered {
        let want = next.entry(r.partition).or_insert(1);
        ensure!(
            r.sequence == Some(*want),
            "after the refused numbering, partition {} position {}: {:?}, want {want}",
            r.partition,
            r.position,
            r.sequence
        );
        *want += 1;
    }
    Ok(())
}

/// Inbox prune deletes a consumer's rows recorded before the cutoff, at
/// most `limit`, keeps younger rows, rows of other consumers and rows of
/// messages that still have a dead letter (a late redelivery stays
/// skipped).
pub async fn inbox_prune_test<F: StoreFixture>(f: F) -> anyhow::Result<()> {
    if !applicable(&f, Scenario::InboxPrune) {
        return Ok(());
    }
    let inbox = f.inbox();
    let old: Vec<Message> = (0..3)
        .map(|n| message("orders", "k", n))
        .collect::<anyhow::Result<_>>()?;
    let young = message("orders", "k", 10)?;
    let dead = message("orders", "k", 11)?;
    let mut tx = inbox.begin().await?;
    for m in &old {
        ensure!(inbox.record(&mut tx, "billing", m, hours_ago(48)).await? == InboxOutcome::New);
        ensure!(inbox.record(&mut tx, "shipping", m, hours_ago(48)).await? == InboxOutcome::New);
    }
    ensure!(inbox.record(&mut tx, "billing", &young, Utc::now()).await? == InboxOutcome::New);
    inbox.commit(tx).await?;
    let mut letter = dead_letter_of(&dead, "failed (test)")?;
    letter.dead_at = hours_ago(48);
    inbox.dead_letter("billing", &letter).await?;

    let cutoff = hours_ago(24);
    ensure!(
        inbox.prune("billing", cutoff, 2).await? == 2,
        "at most limit rows"
    );
    ensure!(inbox.prune("billing", cutoff, 100).await? == 1);
    ensure!(inbox.prune("billing", cutoff, 100).await? == 0);
    for m in &old {
        ensure!(
            !inbox.is_recorded("billing", m.id).await?,
            "old row {} kept",
            m.id
        );
        ensure!(
            inbox.is_recorded("shipping", m.id).await?,
            "another consumer's row went"
        );
    }
    ensure!(
        inbox.is_recorded("billing", young.id).await?,
        "a young row went"
    );
    ensure!(
        record_one(&inbox, "billing", &dead).await? == InboxOutcome::Duplicate,
        "the row of a dead-lettered message must stay"
    );
    Ok(())
}

/// A 1 MiB payload goes through the outbox, the relay and the inbox
/// unchanged.
pub async fn large_payload_test<F: StoreFixture>(f: F) -> anyhow::Result<()>
where
    Collect: custody_core::Handler<<F::Inbox as InboxStore>::Tx>,
{
    let payload: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let big = Message::builder("orders", "big", "Blob")
        .created_at(Utc::now().trunc_subsecs(3))
        .payload("application/octet-stream", payload.clone())
        .build()?;
    let small = message("orders", "big", 2)?;
    let sent = vec![big, small];
    f.enqueue(&sent, true).await?;
    let broker = MemoryBroker::default();
    let mut r = relay(f.outbox(), &broker);
    relay_until(&mut r, &broker, 2).await?;
    let mut c = consumer(f.inbox(), &broker, "billing");
    consume_all(&mut c).await?;
    let seen = c.handler().seen();
    same_messages(&seen, &sent)?;
    ensure!(seen[0].payload.len() == payload.len());
    Ok(())
}

/// Messages on many topics all go out and are applied, each topic's key
/// in order.
pub async fn many_topics_test<F: StoreFixture>(f: F) -> anyhow::Result<()>
where
    Collect: custody_core::Handler<<F::Inbox as InboxStore>::Tx>,
{
    const TOPICS: u64 = 50;
    let mut sent = Vec::new();
    for n in 0..2 {
        for t in 0..TOPICS {
            sent.push(message(&format!("topic.{t}"), &format!("k{}", t % 7), n)?);
        }
    }
    f.enqueue(&sent, true).await?;
    let broker = MemoryBroker::default();
    let outbox = f.outbox();
    let mut r = relay(outbox.clone(), &broker);
    relay_until(&mut r, &broker, sent.len()).await?;
    relay_idle(&mut r, &outbox).await?;
    let mut c = consumer(f.inbox(), &broker, "billing");
    consume_all(&mut c).await?;
    let seen = c.handler().seen();
    ensure!(
        seen.len() == sent.len(),
        "applied {} of {}",
        seen.len(),
        sent.len()
    );
    let topics: BTreeSet<&str> = seen.iter().map(|m| m.topic.as_str()).collect();
    ensure!(topics.len() == TOPICS as usize);
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    for m in &seen {
        let n = n_of(m).unwrap_or(u64::MAX);
        if let Some(prev) = last.insert(m.topic.as_str(), n) {
            ensure!(prev < n, "topic {}: {n} after {prev}", m.topic);
        }
    }
    Ok(())
}
