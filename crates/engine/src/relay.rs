use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use custody_core::{
    Backoff, BreakerState, CircuitBreaker, CircuitBreakerConfig, Clock, Error, OutboxRecord,
    OutboxStore, PublishAck, Publisher, Result, RowWrite, Sequence, SystemClock,
};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metric_definitions as m;
use crate::{after, before, prune_in_batches};

/// Relay settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RelayConfig {
    /// Messages read per batch.
    pub batch_size: usize,
    /// Keys published concurrently within a batch (each key stays sequential).
    pub max_concurrent_keys: usize,
    /// How long a partition lease lasts without renewal; a dead relay's
    /// partitions move to others after this.
    #[serde(with = "custody_core::duration_serde")]
    pub lease_ttl: Duration,
    /// Longest wait for new messages when idle (LISTEN/NOTIFY or an
    /// in-process signal usually wakes the relay earlier).
    #[serde(with = "custody_core::duration_serde")]
    pub poll_interval: Duration,
    /// Longest wait for new messages while traffic flows (the last step that
    /// found messages was less than `poll-interval` ago). Producers need not
    /// wake a busy relay (PostgreSQL: `PgOutbox` notifies at most once per
    /// `notify-interval`), so this bounds the relay's share of the latency.
    #[serde(with = "custody_core::duration_serde")]
    pub busy_poll_interval: Duration,
    /// Failed attempts of one message (while the transport is otherwise
    /// healthy) before it is dead-lettered.
    pub max_attempts: u32,
    /// Backoff between attempts of one message.
    pub backoff: Backoff,
    /// Circuit breaker for the transport.
    pub breaker: CircuitBreakerConfig,
    /// How long published and dead-lettered rows stay in the outbox as
    /// history (reconciliation and trace read it) before they are pruned.
    #[serde(with = "custody_core::duration_serde")]
    pub retention: Duration,
    /// How often the relay prunes its partitions.
    #[serde(with = "custody_core::duration_serde")]
    pub prune_interval: Duration,
    /// Rows deleted per prune statement (short transactions, no long locks).
    pub prune_batch: usize,
    /// Number each partition's messages and stamp them (live gap detection,
    /// docs/SEQUENCES.md). Costs one UPDATE per batch; off, consumers see
    /// no numbers and only id-level `custody reconcile` checks the flow.
    pub sequence_numbers: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 500,
            max_concurrent_keys: 64,
            lease_ttl: Duration::from_secs(10),
            poll_interval: Duration::from_millis(500),
            busy_poll_interval: Duration::from_millis(2),
            max_attempts: 10,
            backoff: Backoff::default(),
            breaker: CircuitBreakerConfig::default(),
            retention: Duration::from_secs(24 * 3600),
            prune_interval: Duration::from_secs(60),
            prune_batch: 1000,
            sequence_numbers: true,
        }
    }
}

/// What a relay has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Messages published and marked.
    pub published: u64,
    /// Publishes the transport reported as duplicates (already stored).
    pub duplicates: u64,
    /// Failed publish attempts.
    pub failures: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Batches read.
    pub batches: u64,
    /// Outbox rows pruned after their retention.
    pub pruned: u64,
}

/// The producer id a relay stamps its records with (see
/// [`custody_core::sequence`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum ProducerId {
    /// Not read from the store yet (read before the first batch is numbered).
    Unknown,
    /// Nothing is numbered: the store keeps no producer id, or
    /// [`RelayConfig::sequence_numbers`] is off.
    Anonymous,
    /// Records are numbered and stamped with this id.
    Known(String),
}

impl From<Option<String>> for ProducerId {
    fn from(id: Option<String>) -> Self {
        id.map_or(ProducerId::Anonymous, ProducerId::Known)
    }
}

/// Moves committed outbox messages to a transport.
///
/// One relay holds a set of partitions through leases; within a partition it
/// publishes committed rows as it finds them (in position order among those
/// found together), keys concurrently, each key sequentially, and marks a
/// message published only after the transport's durable ack.
pub struct Relay<S, P, C = SystemClock> {
    store: S,
    publisher: Arc<P>,
    config: RelayConfig,
    id: String,
    clock: C,
    rng: StdRng,
    breaker: CircuitBreaker,
    partitions: Vec<u32>,
    lease_renew_at: Option<DateTime<Utc>>,
    prune_at: Option<DateTime<Utc>>,
    last_success: Option<DateTime<Utc>>,
    /// The producer id the relay stamps records with, once read.
    producer: ProducerId,
    /// When a step last found messages (picks the idle wait).
    last_busy: Option<DateTime<Utc>>,
    /// Another process's instance and heartbeat, when the store refused this
    /// relay's id because of them (see [`Relay::id_in_use`]).
    id_holder: Option<(String, DateTime<Utc>)>,
    stats: RelayStats,
}

/// Batches one [`Relay::step`] publishes back to back (pipelined) while the
/// outbox has full batches waiting; bounds how long a step runs.
const MAX_BATCHES_PER_STEP: usize = 16;

/// Outcome of publishing one batch.
#[derive(Debug, Default)]
struct BatchOutcome {
    acked: Vec<(i64, PublishAck)>,
    failed: Vec<(OutboxRecord, Error)>,
}

impl<S: OutboxStore, P: Publisher> Relay<S, P, SystemClock> {
    /// A relay with a random id, the system clock and an entropy-seeded RNG.
    pub fn new(store: S, publisher: P, config: RelayConfig) -> Self {
        let id = format!("relay-{}", uuid::Uuid::now_v7().simple());
        Relay {
            breaker: CircuitBreaker::new(config.breaker),
            store,
            publisher: Arc::new(publisher),
            config,
            id,
            clock: SystemClock,
            rng: StdRng::from_entropy(),
            partitions: Vec::new(),
            lease_renew_at: None,
            prune_at: None,
            last_success: None,
            producer: ProducerId::Unknown,
            last_busy: None,
            id_holder: None,
            stats: RelayStats::default(),
        }
    }
}

impl<S: OutboxStore, P: Publisher, C: Clock> Relay<S, P, C> {
    /// Use another clock (tests, simulation).
    pub fn with_clock<C2: Clock>(self, clock: C2) -> Relay<S, P, C2> {
        Relay {
            store: self.store,
            publisher: self.publisher,
            config: self.config,
            id: self.id,
            clock,
            rng: self.rng,
            breaker: self.breaker,
            partitions: self.partitions,
            lease_renew_at: self.lease_renew_at,
            prune_at: self.prune_at,
            last_success: self.last_success,
            producer: self.producer,
            last_busy: self.last_busy,
            id_holder: self.id_holder,
            stats: self.stats,
        }
    }

    /// Use a seeded RNG for backoff jitter (deterministic tests).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = StdRng::seed_from_u64(seed);
        self
    }

    /// Set the relay's id (its name in the lease table). Ids must be unique
    /// among live relays of one outbox.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// The relay's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Partitions held after the last lease round.
    pub fn partitions(&self) -> &[u32] {
        &self.partitions
    }

    /// When the transport last acknowledged a message (health checks).
    pub fn last_success(&self) -> Option<DateTime<Utc>> {
        self.last_success
    }

    /// Counters so far.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Run until `cancel` fires, then give back the leases and return the
    /// counters. Transient store errors are logged and retried; the relay only
    /// returns an error for terminal ones (bad schema, bad configuration).
    pub async fn run(mut self, cancel: CancellationToken) -> Result<RelayStats> {
        info!(relay = %self.id, "relay started");
        let mut store_backoff_attempt = 0u32;
        while !cancel.is_cancelled() {
            match self.step().await {
                Ok(0) => {
                    store_backoff_attempt = 0;
                    let wait = self.idle_wait();
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = self.store.wait_for_new(wait) => {}
                    }
                }
                Ok(_) => {
                    store_backoff_attempt = 0;
                    self.last_busy = Some(self.clock.now());
                }
                Err(e) if e.retryable() => {
                    store_backoff_attempt = store_backoff_attempt.saturating_add(1);
                    let delay = self
                        .config
                        .backoff
                        .delay(store_backoff_attempt, &mut self.rng);
                    warn!(relay = %self.id, error = %e, ?delay, "relay step failed; retrying");
                    // a lost connection may also have lost our leases: renew first
                    self.lease_renew_at = None;
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if let Err(e) = self.store.release_leases(&self.id).await {
            warn!(relay = %self.id, error = %e, "could not release leases; they expire after the lease ttl");
        }
        info!(relay = %self.id, published = self.stats.published, "relay stopped");
        Ok(self.stats)
    }

    /// The store refused this relay's id: another process's heartbeat holds
    /// it. That process may have crashed (its heartbeat goes stale after the
    /// lease ttl, and the id is free), so the first refusal is retryable;
    /// once the holder's heartbeat has moved while we waited, it is alive
    /// and the refusal is terminal: `run` returns it.
    fn id_in_use(&mut self, e: Error) -> Error {
        let Error::RelayIdInUse {
            relay,
            other,
            heartbeat_at,
            ..
        } = e
        else {
            return e;
        };
        let live = match &self.id_holder {
            Some((seen, at)) => *seen == other && *at != heartbeat_at,
            None => false,
        };
        if !live {
            warn!(relay = %relay, other = %other, %heartbeat_at,
                "relay id in use by another process; waiting to see whether it is alive");
            self.id_holder = Some((other.clone(), heartbeat_at));
        }
        Error::RelayIdInUse {
            relay,
            other,
            heartbeat_at,
            live,
        }
    }

    fn idle_wait(&self) -> Duration {
        match self.breaker.state() {
            BreakerState::Open { until } => (until - self.clock.now())
                .to_std()
                .unwrap_or(Duration::from_millis(1))
                .min(self.config.poll_interval),
            _ if self.partitions.is_empty() => self.config.lease_ttl / 3,
            _ if self
                .last_busy
                .is_some_and(|t| self.clock.now() < after(t, self.config.poll_interval)) =>
            {
                self.config
                    .busy_poll_interval
                    .min(self.config.poll_interval)
            }
            _ => self.config.poll_interval,
        }
    }

    /// Renew leases if due, then read, publish and settle one batch; while
    /// full batches keep coming and getting through, go on with the next ones
    /// (at most 16, and never past the lease renewal),
    /// marking each batch while the next is fetched and published. When it
    /// returns, everything it published is marked (or its failure recorded).
    /// Returns how many messages were handled (published, failed or
    /// dead-lettered); 0 means idle (nothing due, no partitions, or the
    /// circuit is open).
    pub async fn step(&mut self) -> Result<usize> {
        let now = self.clock.now();
        if self.lease_renew_at.is_none_or(|t| now >= t) {
            self.partitions = match self
                .store
                .acquire_leases(&self.id, self.config.lease_ttl, now)
                .await
            {
                Ok(held) => {
                    self.id_holder = None;
                    held
                }
                Err(e) => return Err(self.id_in_use(e)),
            };
            // renew at a third of the ttl so one slow round does not lose them
            self.lease_renew_at = Some(after(now, self.config.lease_ttl / 3));
            metrics::gauge!(m::RELAY_PARTITIONS_HELD, "relay" => self.id.clone())
                .set(self.partitions.len() as f64);
            debug!(relay = %self.id, partitions = ?self.partitions, "leases renewed");
        }
        if self.partitions.is_empty() {
            return Ok(0);
        }
        if self.prune_at.is_none_or(|t| now >= t) {
            self.prune(now).await?;
        }
        // Fetch before asking the breaker: a half-open breaker allows exactly
        // one probe, and a probe spent on an empty batch (or a failed fetch)
        // would get no verdict and leave the circuit half-open for good.
        let mut batch = self
            .store
            .fetch_batch(&self.partitions, self.config.batch_size, now)
            .await?;
        // Numbering may drop records (a lost lease), so it too comes before
        // the breaker: a probe must not be spent on a batch that empties.
        self.number(&mut batch, now).await?;
        if batch.is_empty() || !self.breaker.allow(now) {
            return Ok(0);
        }
        self.stats.batches += 1;
        let mut handled = batch.len();
        let mut full = batch.len() >= self.config.batch_size;
        // Pipelining, three stages: while batch k+1 is published, batch k is
        // marked and batch k+2 is fetched and numbered (so neither the mark
        // nor the fetch and numbering is on the path from one publish to the
        // next). Rows of k and k+1 are still pending, so the fetch leaves
        // them out by position.
        let in_flight: Vec<i64> = batch.iter().map(|r| r.position).collect();
        let (mut outcome, mut prepared) = futures::join!(
            self.publish_batch(batch),
            self.prepare_next(full, &in_flight, now),
        );
        let mut batches = 1;
        loop {
            let now = self.clock.now();
            // Go on with the next batch at once only after a full batch that
            // got through completely: then the breaker is closed, no key of
            // this batch is held back (nothing failed, so nothing needs parking
            // before the next fetch), and more is probably waiting. Stop before
            // the leases are due for renewal, so marks are always fenced by a
            // lease this relay renewed in time. A prepared batch not taken is
            // dropped: its rows stay pending (numbered, which they keep).
            let go_on = full
                && outcome.failed.is_empty()
                && batches < MAX_BATCHES_PER_STEP
                && self.lease_renew_at.is_some_and(|t| now < t);
            if !go_on {
                self.settle(outcome, now).await?;
                return Ok(handled);
            }
            self.judge(&outcome, now);
            let acked = outcome.acked;
            let next = match prepared? {
                Some(next) if !next.is_empty() => next,
                _ => {
                    let marked = self.store.mark_published(&self.id, &acked, now).await?;
                    self.count_marked(marked, &acked, now);
                    return Ok(handled);
                }
            };
            let n = next.len();
            let next_full = n >= self.config.batch_size;
            let in_flight: Vec<i64> = acked
                .iter()
                .map(|(p, _)| *p)
                .chain(next.iter().map(|r| r.position))
                .collect();
            let (marked, next_outcome, next_prepared) = futures::join!(
                self.store.mark_published(&self.id, &acked, now),
                self.publish_batch(next),
                self.prepare_next(next_full, &in_flight, now),
            );
            self.count_marked(marked?, &acked, now);
            self.stats.batches += 1;
            batches += 1;
            handled += n;
            full = next_full;
            outcome = next_outcome;
            prepared = next_prepared;
        }
    }

    /// The batch after the rows `in_flight` (being published or marked,
    /// still pending in the store), fetched and numbered, when `wanted`.
    /// `None` when not wanted, nothing else is due, or a partition's lease is
    /// gone (the step ends and the next one renews the leases first).
    async fn prepare_next(
        &self,
        wanted: bool,
        in_flight: &[i64],
        now: DateTime<Utc>,
    ) -> Result<Option<Vec<OutboxRecord>>> {
        if !wanted {
            return Ok(None);
        }
        let mut batch = self
            .store
            .fetch_batch_excluding(&self.partitions, self.config.batch_size, in_flight, now)
            .await?;
        if self.number_batch(&mut batch, now).await? {
            return Ok(None);
        }
        Ok(Some(batch))
    }

    /// Give the batch's new records their partition's next sequence numbers
    /// (stored before anything is published, so a republish keeps them) and
    /// stamp every record with its `(producer, partition, sequence)`.
    async fn number(&mut self, batch: &mut Vec<OutboxRecord>, now: DateTime<Utc>) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        if self.producer == ProducerId::Unknown {
            self.producer = if self.config.sequence_numbers {
                ProducerId::from(self.store.producer_id().await?)
            } else {
                ProducerId::Anonymous
            };
        }
        if self.number_batch(batch, now).await? {
            // some partition's lease is gone: renew before the next batch
            self.lease_renew_at = None;
        }
        Ok(())
    }

    /// [`Relay::number`] once the producer id is known (`&self`, so it can
    /// run next to a mark). Returns whether records were dropped because a
    /// partition's lease is gone.
    async fn number_batch(
        &self,
        batch: &mut Vec<OutboxRecord>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let ProducerId::Known(producer) = &self.producer else {
            return Ok(false);
        };
        if batch.is_empty() {
            return Ok(false);
        }
        let fetched = batch.len();
        self.store.assign_sequences(&self.id, batch, now).await?;
        for rec in batch.iter_mut() {
            if let Some(seq) = rec.sequence {
                Sequence {
                    producer: producer.clone(),
                    topic: rec.message.topic.clone(),
                    partition: rec.partition,
                    seq,
                }
                .stamp(&mut rec.message);
            }
        }
        Ok(batch.len() < fetched)
    }

    /// Delete history older than the retention from the leased partitions,
    /// in bounded batches (at most ten per round, so publishing never waits long).
    async fn prune(&mut self, now: DateTime<Utc>) -> Result<()> {
        self.prune_at = Some(after(now, self.config.prune_interval));
        let Some(older_than) = before(now, self.config.retention) else {
            return Ok(());
        };
        let (store, partitions) = (&self.store, &self.partitions);
        let n = prune_in_batches(self.config.prune_batch, |limit| {
            store.prune(partitions, older_than, limit)
        })
        .await?;
        self.stats.pruned += n;
        metrics::counter!(m::RELAY_PRUNED_TOTAL).increment(n);
        Ok(())
    }

    /// Publish a batch: keys concurrently, each key's messages in order; a
    /// key stops at its first failure so nothing overtakes it.
    async fn publish_batch(&self, batch: Vec<OutboxRecord>) -> BatchOutcome {
        // group by key, keys in order of first appearance, each key's records in position order
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut groups: Vec<Vec<OutboxRecord>> = Vec::new();
        for rec in batch {
            let i = match index.get(&rec.message.key) {
                Some(i) => *i,
                None => {
                    index.insert(rec.message.key.clone(), groups.len());
                    groups.push(Vec::new());
                    groups.len() - 1
                }
            };
            groups[i].push(rec);
        }
        let chains = groups.into_iter().map(|recs| {
            let publisher = Arc::clone(&self.publisher);
            async move {
                let mut out = BatchOutcome::default();
                for rec in recs {
                    let sent = if rec.republish > 0 {
                        // repaired or redriven: a fresh transport dedupe id
                        publisher.publish_again(&rec.message, rec.republish).await
                    } else {
                        publisher.publish(&rec.message).await
                    };
                    match sent {
                        Ok(ack) => out.acked.push((rec.position, ack)),
                        Err(e) => {
                            out.failed.push((rec, e));
                            // the rest of this key waits: order per key
                            break;
                        }
                    }
                }
                out
            }
        });
        let results: Vec<BatchOutcome> = futures::stream::iter(chains)
            .buffer_unordered(self.config.max_concurrent_keys.max(1))
            .collect()
            .await;
        let mut all = BatchOutcome::default();
        for r in results {
            all.acked.extend(r.acked);
            all.failed.extend(r.failed);
        }
        all
    }

    /// The breaker's verdict on a batch. The transport is down when nothing
    /// got through and something failed retryably; an ack, or only terminal
    /// (message-specific) errors, mean it answered.
    fn judge(&mut self, outcome: &BatchOutcome, now: DateTime<Utc>) {
        let transport_up = !outcome.acked.is_empty();
        let transport_down = !transport_up && outcome.failed.iter().any(|(_, e)| e.retryable());
        if transport_down {
            self.breaker.on_failure(now);
            if matches!(self.breaker.state(), BreakerState::Open { .. }) {
                metrics::gauge!(m::RELAY_BREAKER_OPEN).set(1.0);
                warn!(relay = %self.id, "transport unavailable; circuit open, backlog kept in the outbox");
            }
        } else {
            self.breaker.on_success();
            metrics::gauge!(m::RELAY_BREAKER_OPEN).set(0.0);
        }
    }

    /// Count `marked` of the `acked` messages as published.
    fn count_marked(&mut self, marked: u64, acked: &[(i64, PublishAck)], now: DateTime<Utc>) {
        if acked.is_empty() {
            return;
        }
        if marked < acked.len() as u64 {
            // Lease lost while publishing (another relay took the partition):
            // the new holder republishes; transport and inbox dedupe by id.
            warn!(relay = %self.id, marked, published = acked.len(), "lease lost during batch; renewing");
            self.lease_renew_at = None;
        }
        self.stats.published += marked;
        self.stats.duplicates += acked.iter().filter(|(_, a)| a.duplicate).count() as u64;
        metrics::counter!(m::RELAY_PUBLISHED_TOTAL, "relay" => self.id.clone()).increment(marked);
        self.last_success = Some(now);
    }

    /// Record the outcome of a batch in the store.
    async fn settle(&mut self, outcome: BatchOutcome, now: DateTime<Utc>) -> Result<()> {
        // The breaker's verdict first, before any store write can fail and
        // return early: a probe must always get one.
        self.judge(&outcome, now);
        let transport_up = !outcome.acked.is_empty();
        if transport_up {
            let marked = self
                .store
                .mark_published(&self.id, &outcome.acked, now)
                .await?;
            self.count_marked(marked, &outcome.acked, now);
        }
        for (rec, err) in outcome.failed {
            self.stats.failures += 1;
            let retryable = err.retryable();
            metrics::counter!(m::RELAY_PUBLISH_FAILURES_TOTAL, "retryable" => retryable.to_string())
                .increment(1);
            let attempts = rec.attempts.saturating_add(1);
            if !retryable {
                warn!(message_id = %rec.message.id, error = %err, "terminal publish error; dead-lettering");
                self.dead_letter(&rec, &format!("publish failed permanently: {err}"), now)
                    .await?;
            } else if transport_up {
                // The transport accepts other messages, so this failure is the
                // message's own: park its key with backoff, dead-letter at the limit.
                if attempts >= self.config.max_attempts {
                    warn!(message_id = %rec.message.id, attempts, error = %err, "giving up; dead-lettering");
                    let reason = format!("publish failed {attempts} times while the transport accepted other messages; last error: {err}");
                    self.dead_letter(&rec, &reason, now).await?;
                } else {
                    let delay = self.config.backoff.delay(attempts, &mut self.rng);
                    let retry_at = after(now, delay);
                    let done = self
                        .store
                        .record_failure(&self.id, rec.position, &err.to_string(), retry_at, now)
                        .await?;
                    self.fenced(done, &rec);
                }
            } else {
                // Nothing in the batch got through: the transport is down. The
                // messages stay pending in order (no attempt counted against
                // them); the circuit breaker stops us hammering it.
                debug!(message_id = %rec.message.id, error = %err, "transport unavailable");
            }
        }
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        rec: &OutboxRecord,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let done = self
            .store
            .dead_letter(&self.id, rec.position, reason, now)
            .await?;
        if done == RowWrite::Written {
            self.stats.dead_lettered += 1;
            metrics::counter!(m::RELAY_DEAD_LETTERED_TOTAL).increment(1);
        }
        self.fenced(done, rec);
        Ok(())
    }

    /// A write about `rec` the store fenced off: the partition's lease is
    /// gone (its new holder decides about the row), so renew before the next
    /// batch. Not an error.
    fn fenced(&mut self, done: RowWrite, rec: &OutboxRecord) {
        match done {
            RowWrite::Written => {}
            RowWrite::Fenced => {
                warn!(relay = %self.id, message_id = %rec.message.id, partition = rec.partition,
                    "lease lost: the failure of this message is left to the partition's new holder; renewing");
                self.lease_renew_at = None;
            }
            RowWrite::NotPending => {
                debug!(relay = %self.id, message_id = %rec.message.id, "row no longer pending; nothing to record");
            }
        }
    }
}
