//! `Relay::step` publishes full batches back to back and marks batch k while
//! batch k+1 is fetched and published. These tests make the mark slow (it
//! yields before touching the store), so the next fetch really sees batch
//! k's rows still pending and must leave them out.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use custody_core::{ManualClock, Message, OutboxRecord, OutboxStore, PublishAck, Result, RowWrite};
use custody_engine::{Relay, RelayConfig};
use custody_testkit::memory::{MemoryBroker, MemoryOutbox, RowStatus};
use uuid::Uuid;

/// A [`MemoryOutbox`] whose `mark_published` lets other futures run first,
/// as a database round trip would.
#[derive(Clone)]
struct SlowMark(MemoryOutbox);

impl OutboxStore for SlowMark {
    fn partitions(&self) -> u32 {
        self.0.partitions()
    }

    async fn acquire_leases(
        &self,
        relay: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<u32>> {
        self.0.acquire_leases(relay, ttl, now).await
    }

    async fn release_leases(&self, relay: &str) -> Result<()> {
        self.0.release_leases(relay).await
    }

    async fn fetch_batch(
        &self,
        partitions: &[u32],
        limit: usize,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxRecord>> {
        self.0.fetch_batch(partitions, limit, now).await
    }

    async fn mark_published(
        &self,
        relay: &str,
        acked: &[(i64, PublishAck)],
        now: DateTime<Utc>,
    ) -> Result<u64> {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        self.0.mark_published(relay, acked, now).await
    }

    async fn record_failure(
        &self,
        relay: &str,
        position: i64,
        error: &str,
        retry_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<RowWrite> {
        self.0
            .record_failure(relay, position, error, retry_at, now)
            .await
    }

    async fn dead_letter(
        &self,
        relay: &str,
        position: i64,
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<RowWrite> {
        self.0.dead_letter(relay, position, error, now).await
    }

    async fn producer_id(&self) -> Result<Option<String>> {
        self.0.producer_id().await
    }

    async fn assign_sequences(
        &self,
        relay: &str,
        records: &mut Vec<OutboxRecord>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        self.0.assign_sequences(relay, records, now).await
    }

    async fn prune(
        &self,
        partitions: &[u32],
        older_than: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64> {
        self.0.prune(partitions, older_than, limit).await
    }

    async fn wait_for_new(&self, timeout: Duration) {
        self.0.wait_for_new(timeout).await
    }
}

const BATCH: usize = 7;

fn config() -> RelayConfig {
    RelayConfig {
        batch_size: BATCH,
        max_concurrent_keys: 3,
        ..RelayConfig::default()
    }
}

/// 40 messages on each of keys k0..k2, interleaved; returns them in enqueue order.
fn fill(outbox: &MemoryOutbox) -> Vec<Message> {
    let mut msgs = Vec::new();
    for i in 0..120u32 {
        let m = Message::builder("pipe", format!("k{}", i % 3), "Step")
            .json(&i)
            .and_then(|b| b.build())
            .expect("valid message");
        outbox.enqueue(m.clone());
        msgs.push(m);
    }
    msgs
}

fn by_key(msgs: &[Message]) -> HashMap<String, Vec<Uuid>> {
    let mut out: HashMap<String, Vec<Uuid>> = HashMap::new();
    for m in msgs {
        out.entry(m.key.clone()).or_default().push(m.id);
    }
    out
}

#[tokio::test]
async fn pipelined_batches_publish_each_message_once_in_key_order_and_leave_it_marked() {
    let outbox = MemoryOutbox::new(4);
    let broker = MemoryBroker::default();
    let msgs = fill(&outbox);
    let clock = ManualClock::new(Utc::now());
    let mut relay = Relay::new(SlowMark(outbox.clone()), broker.clone(), config())
        .with_clock(clock.clone())
        .with_id("pipe");

    let first = relay.step().await.expect("step");
    assert!(
        first > BATCH,
        "one step went on past its first full batch ({first})"
    );
    // everything the step published is marked when it returns
    let stored = broker.stored();
    assert_eq!(stored.len(), first);
    for m in &stored {
        assert_eq!(outbox.status(m.id), Some(RowStatus::Published), "{}", m.id);
    }
    while relay.step().await.expect("step") > 0 {}

    assert_eq!(outbox.pending(), 0);
    let stored = broker.stored();
    assert_eq!(stored.len(), msgs.len(), "each message stored once");
    assert_eq!(
        relay.stats().duplicates,
        0,
        "no message still being marked was published again"
    );
    assert_eq!(relay.stats().published, msgs.len() as u64);
    assert_eq!(by_key(&stored), by_key(&msgs), "per-key order");
}

#[tokio::test]
async fn a_failure_in_a_pipelined_batch_ends_the_step_and_holds_back_only_its_key() {
    let outbox = MemoryOutbox::new(4);
    let broker = MemoryBroker::default();
    let msgs = fill(&outbox);
    // in the third batch
    let bad = msgs[2 * BATCH + 1].clone();
    broker.poison(bad.id);
    let clock = ManualClock::new(Utc::now());
    let mut relay = Relay::new(SlowMark(outbox.clone()), broker.clone(), config())
        .with_clock(clock.clone())
        .with_id("pipe");

    let handled = relay.step().await.expect("step");
    assert_eq!(
        handled,
        3 * BATCH,
        "the step stopped after the failing batch"
    );
    assert_eq!(relay.stats().failures, 1);
    let stored = broker.stored();
    assert!(stored.iter().all(|m| m.id != bad.id));
    assert!(
        stored.iter().all(|m| m.key != bad.key
            || msgs.iter().position(|x| x.id == m.id) < msgs.iter().position(|x| x.id == bad.id)),
        "nothing of the failing key after it"
    );
    for m in &stored {
        assert_eq!(outbox.status(m.id), Some(RowStatus::Published), "{}", m.id);
    }

    // the key is parked, the others flow
    while relay.step().await.expect("step") > 0 {}
    let stored = broker.stored();
    assert!(stored.iter().all(|m| m.key != bad.key
        || msgs.iter().position(|x| x.id == m.id) < msgs.iter().position(|x| x.id == bad.id)));
    assert_eq!(outbox.pending(), 40 - (2 * BATCH + 1) / 3);
    let others: Vec<Message> = msgs.iter().filter(|m| m.key != bad.key).cloned().collect();
    let mut want = by_key(&others);
    let mut got = by_key(&stored);
    want.remove(&bad.key);
    got.remove(&bad.key);
    assert_eq!(got, want, "per-key order of the other keys");
}
