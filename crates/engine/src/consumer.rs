use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use custody_core::sequence::is_skip_marker;
use custody_core::{escape_text, storable_text};
use custody_core::{
    Backoff, Clock, DeadLetter, Delivery, Handler, HandlerError, InboxOutcome, InboxStore,
    Malformed, Message, PartitionProgress, Result, Sequence, Subscriber, SystemClock,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};
use uuid::Uuid;

use crate::metric_definitions as m;
use crate::{after, before, prune_in_batches};

/// The most messages of a group whose inbox rows are recorded in one go,
/// ahead of their handlers (see `Consumer::apply_group`).
const RECORD_AHEAD: usize = 32;

/// Consumer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConsumerConfig {
    /// The consumer's name: its identity in the inbox and in dead letters.
    pub name: String,
    /// Deliveries fetched per batch.
    pub batch_size: usize,
    /// Longest wait for a delivery when idle.
    #[serde(with = "custody_core::duration_serde")]
    pub fetch_wait: Duration,
    /// Handler attempts on transient errors before the message is dead-lettered.
    pub max_attempts: u32,
    /// Backoff between handler attempts and while the consumer's own database is down.
    pub backoff: Backoff,
    /// How long inbox rows (the dedupe records) are kept before pruning.
    /// Must exceed the transport's redelivery horizon and cover every
    /// reconciliation window (docs/OPERATIONS.md). Default 7 days.
    #[serde(with = "custody_core::duration_serde")]
    pub inbox_retention: Duration,
    /// How often the consumer prunes its inbox.
    #[serde(with = "custody_core::duration_serde")]
    pub prune_interval: Duration,
    /// Inbox rows deleted per prune statement.
    pub prune_batch: usize,
    /// How often the consumer looks for dead letters an operator redrove.
    #[serde(with = "custody_core::duration_serde")]
    pub redrive_interval: Duration,
    /// Apply the well-formed deliveries of a fetched batch in one
    /// transaction (one commit, one fsync) instead of one each. A failing
    /// message falls back to the one-at-a-time path, after the messages
    /// before it are committed, so retries and dead letters behave the same.
    pub group_commit: bool,
    /// Longest a group transaction keeps taking messages before it commits
    /// what it has: acks wait for the commit, and a group held open longer
    /// than the transport's ack wait (slow database link) would be
    /// redelivered while still being applied. Checked between the runs of
    /// messages whose inbox rows are recorded together (at most 32, sized
    /// from the time a message has taken so far, or in the last group), so
    /// a group that turns slow midway can overrun it by part of a run.
    #[serde(with = "custody_core::duration_serde")]
    pub group_max_time: Duration,
    /// How often the consumer folds hole-free runs of numbered inbox rows
    /// into its per-partition floors and checks for sequence gaps
    /// (docs/SEQUENCES.md).
    #[serde(with = "custody_core::duration_serde")]
    pub watermark_interval: Duration,
    /// Numbered inbox rows younger than this stay when they are folded into
    /// a floor, for id-level reconciliation (`custody reconcile`); like
    /// `inbox-retention`, it must cover the reconciliation windows.
    /// Dedupe does not need them: the floor answers for them.
    #[serde(with = "custody_core::duration_serde")]
    pub compact_keep: Duration,
    /// A sequence gap open longer than this is logged as a warning (shorter
    /// gaps are messages still in flight: keys publish concurrently, and a
    /// redelivery takes up to the transport's ack wait).
    #[serde(with = "custody_core::duration_serde")]
    pub gap_grace: Duration,
    /// Poison messages: a message whose handler was started alone by this
    /// many runs of the consumer (processes) that never finished it (the
    /// process crashed, aborted, was killed or hung until a restart) is
    /// dead-lettered as poison instead of being handed to the handler
    /// again. A message an earlier run started and did not finish is
    /// always applied alone, so a crash is attributed to it and not to its
    /// group. Costs one statement per group before the handlers run (and
    /// one in the group's transaction). 0 turns the detection off.
    /// Default 3.
    pub poison_after: u32,
    /// Longest the handler may take for one message; past it the attempt
    /// is abandoned (its transaction rolled back) as a transient failure,
    /// retried with backoff and dead-lettered after `max-attempts`. "0ms":
    /// no limit. Default 30s.
    #[serde(with = "custody_core::duration_serde")]
    pub handler_timeout: Duration,
    /// A partition with no history whose lowest number is above 1, with no
    /// lower number arrived within `gap_grace`, is a stream that did not
    /// begin at 1 (JetStream `max_age`, a consumer added later): its floor
    /// starts below the lowest number, with a warning and an audit record
    /// (docs/SEQUENCES.md). A lower number arriving later is dead-lettered,
    /// never dropped. `false`: such numbers stay holes until accepted.
    pub accept_stream_start: bool,
    /// The bound on how long one missing number can pin the inbox: a gap
    /// open longer than this is accepted as lost by the consumer itself,
    /// with an error log and an audit record (`custody_gap_accepted`, by
    /// `consumer:<name>`), so that compaction and retention go on. A
    /// message of an accepted number that arrives later is dead-lettered.
    /// Keep it longer than any outage you would repair by hand.
    #[serde(with = "custody_core::duration_serde")]
    pub gap_accept_after: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig::new("consumer")
    }
}

impl ConsumerConfig {
    /// Defaults with this consumer name.
    pub fn new(name: impl Into<String>) -> Self {
        ConsumerConfig {
            name: name.into(),
            batch_size: 100,
            fetch_wait: Duration::from_millis(500),
            max_attempts: 5,
            backoff: Backoff {
                base: Duration::from_millis(50),
                max: Duration::from_secs(5),
            },
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
            prune_batch: 1000,
            redrive_interval: Duration::from_secs(1),
            group_commit: true,
            group_max_time: Duration::from_millis(250),
            watermark_interval: Duration::from_secs(5),
            compact_keep: Duration::from_secs(24 * 3600),
            gap_grace: Duration::from_secs(60),
            poison_after: 3,
            handler_timeout: Duration::from_secs(30),
            accept_stream_start: true,
            gap_accept_after: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// What a consumer has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Messages whose effect was committed.
    pub processed: u64,
    /// Redeliveries the inbox recognised and skipped.
    pub duplicates: u64,
    /// Messages dead-lettered (malformed, unknown type, permanent error, too many attempts).
    pub dead_lettered: u64,
    /// Handler retries after transient errors.
    pub retries: u64,
    /// Redriven dead letters taken from the redrive queue.
    pub redriven: u64,
    /// Inbox rows pruned after their retention.
    pub pruned: u64,
    /// Skip markers accounted for: numbers of messages the relay
    /// dead-lettered (no handler runs).
    pub skipped: u64,
    /// Inbox rows folded into sequence floors.
    pub compacted: u64,
}

/// How one message was settled (counted, then acknowledged).
enum Settled {
    Processed,
    Skipped,
    Duplicate,
    DeadLettered,
}

/// How the single-message path (`Consumer::process`) ended.
enum Processed {
    /// Settled: count it and acknowledge it.
    Settled(Settled),
    /// Cancelled while waiting out a transient failure, before it was
    /// settled: leave it unacknowledged (it is redelivered).
    Cancelled,
}

impl Settled {
    fn of(outcome: InboxOutcome, msg: &Message) -> Settled {
        match outcome {
            InboxOutcome::New if is_skip_marker(msg) => Settled::Skipped,
            InboxOutcome::New => Settled::Processed,
            InboxOutcome::Duplicate => Settled::Duplicate,
        }
    }
}

/// Runs a [`Handler`] for every delivery of a [`Subscriber`], each in one
/// transaction with the inbox row, and acknowledges the transport only after
/// the commit.
pub struct Consumer<I, S, H, C = SystemClock> {
    inbox: I,
    subscriber: S,
    handler: H,
    config: ConsumerConfig,
    clock: C,
    rng: StdRng,
    stats: ConsumerStats,
    redrive_at: Option<DateTime<Utc>>,
    prune_at: Option<DateTime<Utc>>,
    watermark_at: Option<DateTime<Utc>>,
    /// Nanoseconds a message of the last committed group took (record and
    /// handler; 0 before the first): sizes a group's first run of records.
    per_message_ns: AtomicU64,
    /// This run's id in the attempts table (poison detection): made at
    /// construction from the rng, so it changes with every process.
    run: Uuid,
}

/// How applying a group ended (see `Consumer::apply_group`).
enum Applied {
    /// Committed: the outcomes of the applied prefix of the group.
    Committed(Vec<InboxOutcome>),
    /// Message `i`'s handler failed; nothing was committed.
    Failed(usize, HandlerError),
    /// Message `i` was started by an earlier run that never finished it:
    /// apply it alone (after the messages before it).
    Suspect(usize),
    /// The (lone) message crashed `crashes` runs: dead-letter it as poison.
    Poison(u32),
}

impl<I, S, H> Consumer<I, S, H, SystemClock>
where
    I: InboxStore,
    S: Subscriber,
    H: Handler<I::Tx>,
{
    /// A consumer with the system clock.
    pub fn new(inbox: I, subscriber: S, handler: H, config: ConsumerConfig) -> Self {
        let mut rng = StdRng::from_entropy();
        Consumer {
            run: Uuid::from_u128(rng.gen()),
            inbox,
            subscriber,
            handler,
            config,
            clock: SystemClock,
            rng,
            stats: ConsumerStats::default(),
            redrive_at: None,
            prune_at: None,
            watermark_at: None,
            per_message_ns: AtomicU64::new(0),
        }
    }
}

impl<I, S, H, C> Consumer<I, S, H, C>
where
    I: InboxStore,
    S: Subscriber,
    H: Handler<I::Tx>,
    C: Clock,
{
    /// Use another clock.
    pub fn with_clock<C2: Clock>(self, clock: C2) -> Consumer<I, S, H, C2> {
        Consumer {
            inbox: self.inbox,
            subscriber: self.subscriber,
            handler: self.handler,
            config: self.config,
            clock,
            rng: self.rng,
            stats: self.stats,
            redrive_at: self.redrive_at,
            prune_at: self.prune_at,
            watermark_at: self.watermark_at,
            per_message_ns: self.per_message_ns,
            run: self.run,
        }
    }

    /// Seed the backoff jitter and the run id (deterministic tests; give a
    /// restarted consumer another seed, or it passes for the same run and
    /// its poison detection counts no crash).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = StdRng::seed_from_u64(seed);
        self.run = Uuid::from_u128(self.rng.gen());
        self
    }

    /// Counters so far.
    pub fn stats(&self) -> &ConsumerStats {
        &self.stats
    }

    /// The handler (e.g. to read state a test handler keeps).
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Run until `cancel` fires. The delivery in hand is finished first
    /// (graceful drain); unacknowledged ones are redelivered after a restart.
    /// Returns an error only for terminal failures (e.g. a missing schema).
    pub async fn run(mut self, cancel: CancellationToken) -> Result<ConsumerStats> {
        info!(consumer = %self.config.name, "consumer started");
        let mut fetch_attempt = 0u32;
        while !cancel.is_cancelled() {
            let _ = self.housekeeping(&cancel).await?;
            let fetched = tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.subscriber.fetch(self.config.batch_size, self.config.fetch_wait) => r,
            };
            let batch = match fetched {
                Ok(b) => {
                    fetch_attempt = 0;
                    b
                }
                Err(e) if e.retryable() => {
                    fetch_attempt = fetch_attempt.saturating_add(1);
                    let delay = self.config.backoff.delay(fetch_attempt, &mut self.rng);
                    warn!(consumer = %self.config.name, error = %e, ?delay, "fetch failed; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
                Err(e) => return Err(e),
            };
            self.handle_batch(batch, &cancel).await?;
        }
        info!(consumer = %self.config.name, processed = self.stats.processed, "consumer stopped");
        Ok(self.stats)
    }

    /// Take redrives and prune the inbox when due, then fetch one batch
    /// (waiting at most `fetch_wait`) and process it. Returns how many
    /// deliveries and redrives were handled.
    pub async fn run_once(&mut self) -> Result<usize> {
        let redriven = self.housekeeping(&CancellationToken::new()).await?;
        let batch = self
            .subscriber
            .fetch(self.config.batch_size, self.config.fetch_wait)
            .await?;
        let n = batch.len();
        self.handle_batch(batch, &CancellationToken::new()).await?;
        Ok(n + redriven)
    }

    /// Redrives and inbox pruning, each when due. Store trouble is logged
    /// and retried at the next interval; it never stops consuming.
    /// Returns how many redrives were taken.
    async fn housekeeping(&mut self, cancel: &CancellationToken) -> Result<usize> {
        let now = self.clock.now();
        let mut redriven = 0;
        if self.redrive_at.is_none_or(|t| now >= t) {
            self.redrive_at = Some(after(now, self.config.redrive_interval));
            match self.drain_redrives(cancel).await {
                Ok(n) => redriven = n,
                Err(e) if e.retryable() => {
                    warn!(consumer = %self.config.name, error = %e, "cannot read the redrive queue; retrying later")
                }
                Err(e) => return Err(e),
            }
        }
        if self.prune_at.is_none_or(|t| now >= t) {
            self.prune_at = Some(after(now, self.config.prune_interval));
            if let Err(e) = self.prune_inbox(now).await {
                warn!(consumer = %self.config.name, error = %e, "inbox pruning failed; retrying at the next interval");
            }
        }
        if self.watermark_at.is_none_or(|t| now >= t) {
            self.watermark_at = Some(after(now, self.config.watermark_interval));
            if let Err(e) = self.watermarks(now).await {
                warn!(consumer = %self.config.name, error = %e, "sequence watermark check failed; retrying at the next interval");
            }
        }
        Ok(redriven)
    }

    /// Fold hole-free runs of numbered inbox rows into the floors, then
    /// export the gaps left (metrics, and a warning per gap older than
    /// `gap_grace`). Returns the progress per producer partition.
    pub async fn watermarks(&mut self, now: DateTime<Utc>) -> Result<Vec<PartitionProgress>> {
        let name = self.config.name.as_str();
        let keep_after = before(now, self.config.compact_keep).unwrap_or(DateTime::<Utc>::MIN_UTC);
        let compaction = self
            .inbox
            .compact(name, keep_after, self.config.prune_batch.max(1))
            .await?;
        self.stats.compacted += compaction.deleted;
        metrics::counter!(m::CONSUMER_INBOX_COMPACTED_TOTAL, "consumer" => name.to_owned())
            .increment(compaction.deleted);
        let mut progress = self.inbox.progress(name).await?;
        if self.accept_lost_numbers(&progress, now).await > 0 {
            self.inbox
                .compact(name, keep_after, self.config.prune_batch.max(1))
                .await?;
            progress = self.inbox.progress(name).await?;
        }
        let mut by_producer: std::collections::BTreeMap<&str, (u64, f64)> = Default::default();
        for p in &progress {
            let e = by_producer.entry(p.producer.as_str()).or_default();
            e.0 += p.holes;
            if let Some(since) = p.gap_since.filter(|_| p.holes > 0) {
                let age = (now - since).to_std().unwrap_or_default().as_secs_f64();
                e.1 = e.1.max(age);
            }
            if p.gap_older_than(self.config.gap_grace, now) {
                warn!(
                    consumer = name,
                    producer = %p.producer,
                    partition = p.partition,
                    first_missing = ?p.first_hole,
                    missing = p.holes,
                    highest_seen = p.high,
                    since = ?p.gap_since,
                    "sequence gap: messages numbered below ones already processed have not arrived; run `custody reconcile --live` to see them and `custody reconcile --repair` to republish"
                );
            }
        }
        for (producer, (holes, age)) in by_producer {
            metrics::gauge!(m::CONSUMER_SEQUENCE_HOLES, "consumer" => name.to_owned(), "producer" => producer.to_owned())
                .set(holes as f64);
            metrics::gauge!(m::CONSUMER_SEQUENCE_GAP_AGE, "consumer" => name.to_owned(), "producer" => producer.to_owned())
                .set(age);
        }
        Ok(progress)
    }

    /// Raise floors the consumer may raise by itself (see
    /// [`ConsumerConfig::accept_stream_start`] and
    /// [`ConsumerConfig::gap_accept_after`]), each with an audit record.
    /// Returns how many floors moved; refusals (a partition with history,
    /// nothing missing) are not errors here.
    async fn accept_lost_numbers(&self, progress: &[PartitionProgress], now: DateTime<Utc>) -> u64 {
        let name = self.config.name.as_str();
        let mut moved = 0;
        for p in progress.iter().filter(|p| p.holes > 0) {
            let (range, reason) = if p.gap_older_than(self.config.gap_accept_after, now) {
                (
                    custody_core::GapRange::FirstHole,
                    format!(
                        "open longer than consumer.gap-accept-after ({:?}): the numbers never arrived; the inbox may not grow without bound",
                        self.config.gap_accept_after
                    ),
                )
            } else if self.config.accept_stream_start
                && p.floor == 0
                && p.compacted == 0
                && p.gap_older_than(self.config.gap_grace, now)
            {
                (
                    custody_core::GapRange::StreamStart,
                    format!(
                        "the stream this consumer reads did not begin at 1 (no lower number arrived within consumer.gap-grace, {:?})",
                        self.config.gap_grace
                    ),
                )
            } else {
                continue;
            };
            let gap = custody_core::GapAcceptance {
                producer: p.producer.clone(),
                topic: p.topic.clone(),
                partition: p.partition,
                range,
                by: format!("consumer:{name}"),
                reason,
            };
            match self.inbox.accept_gap(name, &gap, now).await {
                Ok(done) => {
                    moved += 1;
                    let numbers = custody_core::sequence::runs_text(&done.missing);
                    if gap.range == custody_core::GapRange::StreamStart {
                        warn!(consumer = name, producer = %p.producer, topic = %p.topic, partition = p.partition,
                            starts_after = done.new_floor, accepted = %numbers,
                            "stream starts above 1: the floor starts at {}; numbers {numbers} were never delivered to this consumer (a lower one arriving later is dead-lettered)", done.new_floor);
                    } else {
                        tracing::error!(consumer = name, producer = %p.producer, topic = %p.topic, partition = p.partition,
                            accepted = %numbers, floor = done.new_floor,
                            "sequence gap older than consumer.gap-accept-after accepted as lost: {numbers}; see custody_gap_accepted, and reconcile by id to find the messages");
                    }
                }
                Err(e) => {
                    debug!(consumer = name, producer = %p.producer, partition = p.partition, error = %e, "floor not raised");
                }
            }
        }
        moved
    }

    /// Delete inbox rows older than the retention, in bounded batches (at
    /// most ten per round, so consuming never waits long).
    async fn prune_inbox(&mut self, now: DateTime<Utc>) -> Result<()> {
        let Some(older_than) = before(now, self.config.inbox_retention) else {
            return Ok(());
        };
        let (inbox, name) = (&self.inbox, self.config.name.as_str());
        let n = prune_in_batches(self.config.prune_batch, |limit| {
            inbox.prune(name, older_than, limit)
        })
        .await?;
        self.stats.pruned += n;
        metrics::counter!(m::CONSUMER_INBOX_PRUNED_TOTAL, "consumer" => self.config.name.clone())
            .increment(n);
        Ok(())
    }

    /// Process every message in this consumer's redrive queue (dead letters
    /// an operator sent back) through the inbox and the handler, each
    /// removed from the queue in the handler's transaction. Returns how many
    /// were taken.
    pub async fn drain_redrives(&mut self, cancel: &CancellationToken) -> Result<usize> {
        let mut total = 0;
        loop {
            let batch = self
                .inbox
                .redrives(&self.config.name, self.config.batch_size.max(1))
                .await?;
            if batch.is_empty() {
                return Ok(total);
            }
            for r in batch {
                if cancel.is_cancelled() {
                    return Ok(total);
                }
                // Outside the numbering: its number is already accounted for
                // (the inbox row `dlq redrive` marked), and the floor may be
                // past it, which would read as a duplicate.
                let mut r = r;
                Sequence::unstamp(&mut r.message);
                info!(consumer = %self.config.name, message_id = %r.message.id, "processing redriven message");
                let span = tracing::info_span!("redrive", message_id = %r.message.id, topic = %r.message.topic);
                let settled = match self
                    .process(&r.message, Some(r.seq), cancel)
                    .instrument(span)
                    .await?
                {
                    Processed::Cancelled => return Ok(total),
                    Processed::Settled(s) => s,
                };
                if let Settled::DeadLettered = settled {
                    // dead again: the new dead letter (and its inbox row) are
                    // stored; take it off the queue. Should this fail, the next
                    // drain finds the inbox row and settles it as a duplicate.
                    self.inbox.drop_redrive(r.seq).await?;
                }
                total += 1;
                self.stats.redriven += 1;
                metrics::counter!(m::CONSUMER_REDRIVEN_TOTAL, "consumer" => self.config.name.clone()).increment(1);
                self.count(settled);
            }
        }
    }

    fn count(&mut self, settled: Settled) {
        match settled {
            Settled::Processed => {
                self.stats.processed += 1;
                metrics::counter!(m::CONSUMER_PROCESSED_TOTAL, "consumer" => self.config.name.clone()).increment(1);
            }
            Settled::Skipped => {
                self.stats.skipped += 1;
                metrics::counter!(m::CONSUMER_SKIPPED_TOTAL, "consumer" => self.config.name.clone()).increment(1);
            }
            Settled::Duplicate => {
                self.stats.duplicates += 1;
                metrics::counter!(m::CONSUMER_DUPLICATES_TOTAL, "consumer" => self.config.name.clone()).increment(1);
            }
            Settled::DeadLettered => {
                self.stats.dead_lettered += 1;
            }
        }
    }

    /// Process a fetched batch in order. Runs of well-formed messages are
    /// applied in one transaction (see [`ConsumerConfig::group_commit`]);
    /// malformed ones and failures take the one-at-a-time path. Finishes
    /// the work in hand when cancelled, but starts nothing new.
    async fn handle_batch(
        &mut self,
        batch: Vec<Delivery<S::Token>>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let mut queue: VecDeque<Delivery<S::Token>> = batch.into();
        while !queue.is_empty() && !cancel.is_cancelled() {
            let run = queue.iter().take_while(|d| d.message.is_ok()).count();
            if !self.config.group_commit || run < 2 {
                if let Some(d) = queue.pop_front() {
                    self.handle_delivery(d, cancel).await?;
                }
                continue;
            }
            let mut take = run;
            loop {
                let msgs: Vec<&Message> = queue
                    .iter()
                    .take(take)
                    .filter_map(|d| d.message.as_ref().ok())
                    .collect();
                match self.apply_group(&msgs, None).await {
                    Ok(Applied::Committed(outcomes)) => {
                        let mut tokens = Vec::with_capacity(outcomes.len());
                        for outcome in outcomes {
                            let Some(d) = queue.pop_front() else { break };
                            if let Ok(msg) = &d.message {
                                self.count(Settled::of(outcome, msg));
                            }
                            tokens.push(d.token);
                        }
                        if let Err(e) = self.subscriber.ack_all(tokens).await {
                            warn!(consumer = %self.config.name, error = %e, "ack failed; the messages will be redelivered and skipped as duplicates");
                        }
                        break;
                    }
                    // the messages before the failing one still go in one transaction
                    Ok(Applied::Failed(failed_at, _)) if failed_at > 0 => take = failed_at,
                    // and those before one an earlier run did not finish
                    Ok(Applied::Suspect(at)) if at > 0 => take = at,
                    // the first one fails (handler or store) or may have
                    // crashed an earlier run: the single path applies it
                    // alone, retries, waits out the store or dead-letters it
                    Ok(_) | Err(_) => {
                        if let Some(d) = queue.pop_front() {
                            self.handle_delivery(d, cancel).await?;
                        }
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Apply `msgs` (or, past `group_max_time`, a prefix of them) in one
    /// transaction: inbox rows and effects commit together; returns the
    /// outcomes of the applied prefix, or which message failed (nothing
    /// committed). Store errors are the outer `Err`. `redrive`: the
    /// redrive-queue entry the (single) message comes from, taken off the
    /// queue in the same transaction.
    ///
    /// Poison detection first: the handler attempts are recorded as started
    /// (a statement of their own, committed before any handler runs); a
    /// message an earlier run left unfinished is not applied in a group
    /// ([`Applied::Suspect`]), and a lone message that crashed
    /// `poison_after` runs is not applied at all ([`Applied::Poison`]).
    async fn apply_group(&self, msgs: &[&Message], redrive: Option<i64>) -> Result<Applied> {
        let name = self.config.name.as_str();
        let ids: Vec<Uuid> = msgs.iter().map(|m| m.id).collect();
        if self.config.poison_after > 0 {
            let alone = msgs.len() == 1;
            let attempts = self
                .inbox
                .start_attempts(name, self.run, &ids, alone, self.clock.now())
                .await?;
            if alone {
                if let Some(a) = attempts.first() {
                    if a.crashes >= self.config.poison_after {
                        return Ok(Applied::Poison(a.crashes));
                    }
                    if a.unfinished {
                        warn!(consumer = name, message_id = %ids[0], crashes = a.crashes, "an earlier run started this message and never finished it; applying it alone");
                    }
                }
            } else if let Some(at) = attempts.iter().position(|a| a.unfinished) {
                return Ok(Applied::Suspect(at));
            }
        }
        let mut tx = self.inbox.begin().await?;
        if let Some(seq) = redrive {
            // off the queue iff the effect (or the duplicate) commits
            self.inbox.finish_redrive(&mut tx, seq).await?;
        }
        let now = self.clock.now();
        let started = std::time::Instant::now();
        let budget = self.config.group_max_time;
        let mut outcomes = Vec::with_capacity(msgs.len());
        // Inbox rows are recorded a run of messages at a time, ahead of the
        // run's handlers (one round trip per run on PostgreSQL instead of
        // one per message). The time budget is checked between runs, so a
        // run is sized from what a message takes (so far in this group, else
        // in the last one): about what fits in the rest of the budget, at
        // most RECORD_AHEAD, and a single message while there is no measure.
        let last_group = Duration::from_nanos(self.per_message_ns.load(Ordering::Relaxed));
        while outcomes.len() < msgs.len() {
            let done = outcomes.len();
            let elapsed = started.elapsed();
            if done > 0 && elapsed >= budget {
                break; // commit what we have; the rest goes in the next group
            }
            let per = match u32::try_from(done) {
                Ok(d) if d > 0 => elapsed / d,
                _ => last_group,
            };
            let fits = if per.is_zero() {
                1
            } else {
                usize::try_from(budget.saturating_sub(elapsed).as_nanos() / per.as_nanos())
                    .unwrap_or(RECORD_AHEAD)
            };
            let run = &msgs[done..done + fits.clamp(1, RECORD_AHEAD).min(msgs.len() - done)];
            let recorded = self
                .inbox
                .record_all(&mut tx, &self.config.name, run, now)
                .await?;
            if recorded.len() != run.len() {
                return Err(custody_core::Error::store(
                    "inbox",
                    "record",
                    false,
                    format!(
                        "the inbox store returned {} outcomes for {} messages; this is a bug in the InboxStore implementation",
                        recorded.len(),
                        run.len()
                    ),
                ));
            }
            for (j, (msg, outcome)) in run.iter().zip(recorded).enumerate() {
                if outcome == InboxOutcome::New && is_skip_marker(msg) {
                    // the relay dead-lettered this number's message: the inbox
                    // row accounts for the number; there is nothing to apply
                    debug!(message_id = %msg.id, "skip marker accounted for");
                } else if outcome == InboxOutcome::New {
                    let span = tracing::info_span!("consume", message_id = %msg.id, topic = %msg.topic, r#type = %msg.message_type);
                    let handled = self.handler.handle(&mut tx, msg).instrument(span);
                    let timeout = self.config.handler_timeout;
                    let handled = if timeout.is_zero() {
                        handled.await
                    } else {
                        tokio::time::timeout(timeout, handled)
                            .await
                            .unwrap_or_else(|_| {
                                Err(HandlerError::transient(format!(
                                    "the handler took longer than consumer.handler-timeout ({timeout:?}); the attempt was abandoned and its transaction rolled back. Find what it waits for, or raise the timeout"
                                )))
                            })
                    };
                    if let Err(e) = handled {
                        // dropping the transaction rolls back the inbox rows and the effects
                        return Ok(Applied::Failed(done + j, e));
                    }
                } else {
                    debug!(message_id = %msg.id, "duplicate skipped");
                }
                outcomes.push(outcome);
            }
        }
        if let Ok(n) = u32::try_from(outcomes.len()) {
            if n > 0 {
                let per = started.elapsed() / n;
                let ns = u64::try_from(per.as_nanos()).unwrap_or(u64::MAX);
                self.per_message_ns.store(ns.max(1), Ordering::Relaxed);
            }
        }
        if self.config.poison_after > 0 {
            // the attempts finish iff the effects commit
            self.inbox
                .finish_attempts(&mut tx, name, &ids[..outcomes.len()])
                .await?;
        }
        self.inbox.commit(tx).await?;
        Ok(Applied::Committed(outcomes))
    }

    /// Forget the started attempts of `id` after it was settled outside a
    /// handler transaction (dead-lettered) or abandoned on shutdown, so a
    /// later delivery or redrive starts with a clean count. Best effort: a
    /// row left behind only makes the next run apply the message alone.
    async fn forget_attempts(&self, id: Uuid) {
        if self.config.poison_after == 0 {
            return;
        }
        let name = self.config.name.as_str();
        let done = async {
            let mut tx = self.inbox.begin().await?;
            self.inbox.finish_attempts(&mut tx, name, &[id]).await?;
            self.inbox.commit(tx).await
        };
        if let Err(e) = done.await {
            warn!(consumer = name, message_id = %id, error = %e, "cannot clear the message's handler attempts; the next run applies it alone");
        }
    }

    async fn handle_delivery(
        &mut self,
        delivery: Delivery<S::Token>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let Delivery { message, token, .. } = delivery;
        let settled = match message {
            Ok(msg) => {
                let span = tracing::info_span!("consume", message_id = %msg.id, topic = %msg.topic, r#type = %msg.message_type);
                match self.process(&msg, None, cancel).instrument(span).await? {
                    Processed::Settled(s) => s,
                    Processed::Cancelled => return Ok(()),
                }
            }
            Err(bad) => {
                self.dead_letter_malformed(&bad, cancel).await?;
                Settled::DeadLettered
            }
        };
        self.count(settled);
        if let Err(e) = self.subscriber.ack(token).await {
            // The effect is committed; the redelivery this causes is skipped by the inbox.
            warn!(consumer = %self.config.name, error = %e, "ack failed; the message will be redelivered and skipped as a duplicate");
        }
        Ok(())
    }

    /// Apply one message alone (`redrive`: its seq in the redrive queue,
    /// taken off in the handler's transaction): retry transient failures
    /// with backoff, wait out the inbox store, dead-letter what can never
    /// be applied. A redrive dead-lettered again stays queued: the caller
    /// drops it.
    async fn process(
        &mut self,
        msg: &Message,
        redrive: Option<i64>,
        cancel: &CancellationToken,
    ) -> Result<Processed> {
        let mut handler_attempt = 0u32;
        let mut store_attempt = 0u32;
        loop {
            let failure = match self.apply_group(&[msg], redrive).await {
                Ok(Applied::Committed(outcomes)) => {
                    let outcome = outcomes.first().copied().unwrap_or(InboxOutcome::New);
                    if outcome == InboxOutcome::Duplicate {
                        debug!(message_id = %msg.id, "duplicate skipped");
                    }
                    return Ok(Processed::Settled(Settled::of(outcome, msg)));
                }
                Ok(Applied::Failed(_, e)) => e,
                Ok(Applied::Poison(crashes)) => {
                    let reason = format!(
                        "poison: {crashes} runs of consumer {:?} started this message's handler and never finished it (the process crashed, aborted, was killed or ran out of memory, or hung until a restart); consumer.poison-after is {}. Find the cause in the handler, fix it, then redrive the dead letter",
                        self.config.name, self.config.poison_after
                    );
                    self.dead_letter_message(msg, &reason, crashes, "poison", cancel)
                        .await?;
                    return Ok(Processed::Settled(Settled::DeadLettered));
                }
                Ok(Applied::Suspect(_)) => {
                    return Err(custody_core::Error::store(
                        "inbox",
                        "apply",
                        false,
                        "a lone message was reported as a group's suspect; this is a bug in custody's consumer",
                    ))
                }
                // our own database failed: wait for it, never blame the message
                Err(e) if e.retryable() => {
                    store_attempt = store_attempt.saturating_add(1);
                    let delay = self.config.backoff.delay(store_attempt, &mut self.rng);
                    warn!(consumer = %self.config.name, error = %e, ?delay, "inbox store unavailable; retrying");
                    if !self.sleep(delay, cancel).await {
                        self.forget_attempts(msg.id).await;
                        return Ok(Processed::Cancelled);
                    }
                    continue;
                }
                // the database refused what this message carries: it can
                // never be stored; dead-letter it and go on
                Err(e) if e.is_about_message() => {
                    let reason = format!(
                        "the consumer's database refused this message: {e}"
                    );
                    self.dead_letter_message(msg, &reason, handler_attempt + 1, "rejected", cancel)
                        .await?;
                    return Ok(Processed::Settled(Settled::DeadLettered));
                }
                Err(e) => return Err(e),
            };
            match failure {
                HandlerError::Transient(e) => {
                    handler_attempt = handler_attempt.saturating_add(1);
                    if handler_attempt >= self.config.max_attempts {
                        let reason = format!(
                            "handler failed {handler_attempt} times with transient errors; last: {e}. Fix the cause, then redrive the dead letter"
                        );
                        self.dead_letter_message(
                            msg,
                            &reason,
                            handler_attempt,
                            "transient_exhausted",
                            cancel,
                        )
                        .await?;
                        return Ok(Processed::Settled(Settled::DeadLettered));
                    }
                    self.stats.retries += 1;
                    metrics::counter!(m::CONSUMER_RETRIES_TOTAL, "consumer" => self.config.name.clone()).increment(1);
                    let delay = self.config.backoff.delay(handler_attempt, &mut self.rng);
                    debug!(message_id = %msg.id, error = %e, ?delay, "transient handler error; retrying");
                    if !self.sleep(delay, cancel).await {
                        self.forget_attempts(msg.id).await;
                        return Ok(Processed::Cancelled);
                    }
                }
                HandlerError::UnknownType(t) => {
                    let reason = format!(
                        "unknown message type {t:?} for consumer {:?}; add a handler for it or stop routing it here, then redrive",
                        self.config.name
                    );
                    self.dead_letter_message(
                        msg,
                        &reason,
                        handler_attempt + 1,
                        "unknown_type",
                        cancel,
                    )
                    .await?;
                    return Ok(Processed::Settled(Settled::DeadLettered));
                }
                e => {
                    let inner = match &e {
                        HandlerError::Permanent(inner) => inner.to_string(),
                        other => other.to_string(),
                    };
                    let reason = format!("handler failed permanently: {inner}");
                    self.dead_letter_message(
                        msg,
                        &reason,
                        handler_attempt + 1,
                        "permanent",
                        cancel,
                    )
                    .await?;
                    return Ok(Processed::Settled(Settled::DeadLettered));
                }
            }
        }
    }

    async fn sleep(&self, d: Duration, cancel: &CancellationToken) -> bool {
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    async fn dead_letter_message(
        &mut self,
        msg: &Message,
        reason: &str,
        attempts: u32,
        label: &'static str,
        cancel: &CancellationToken,
    ) -> Result<()> {
        warn!(consumer = %self.config.name, message_id = %msg.id, reason, "dead-lettering");
        let dead = DeadLetter {
            message_id: Some(msg.id),
            origin: format!("consumer:{}", self.config.name),
            topic: storable_text(&msg.topic).into_owned(),
            key: Some(storable_text(&msg.key).into_owned()),
            message_type: Some(storable_text(&msg.message_type).into_owned()),
            payload: msg.payload.clone(),
            envelope: serde_json::to_string(msg).ok(),
            error: storable_text(reason).into_owned(),
            attempts,
            dead_at: self.clock.now(),
        };
        self.store_dead_letter(dead, label, cancel).await?;
        self.forget_attempts(msg.id).await;
        Ok(())
    }

    /// Dead-letter what a transport could not decode. Under the id it
    /// claims only when this consumer has not settled that id already: a
    /// malformed copy (a forgery, a corrupted redelivery) of a message whose
    /// effect is committed must not make `custody trace` report the
    /// message dead; such a copy is stored without the id.
    async fn dead_letter_malformed(
        &mut self,
        bad: &Malformed,
        cancel: &CancellationToken,
    ) -> Result<()> {
        warn!(consumer = %self.config.name, message_id = ?bad.id, reason = %bad.reason, "malformed message; dead-lettering");
        let mut message_id = bad.id;
        let mut note = String::new();
        if let Some(claimed) = bad.id {
            match self.inbox.is_recorded(&self.config.name, claimed).await {
                Ok(false) => {}
                Ok(true) => {
                    message_id = None;
                    note = format!(" (it claims id {claimed}, which this consumer has already settled; stored without the id so the record of that message stands)");
                }
                Err(e) => {
                    message_id = None;
                    note = format!(" (it claims id {claimed}; stored without the id because the inbox could not be read: {e})");
                }
            }
        }
        let dead = DeadLetter {
            message_id,
            origin: format!("consumer:{}", self.config.name),
            topic: storable_text(&bad.topic).into_owned(),
            key: None,
            message_type: None,
            payload: bad.payload.clone(),
            envelope: None,
            error: storable_text(&format!("malformed message: {}{note}", bad.reason)).into_owned(),
            attempts: 1,
            dead_at: self.clock.now(),
        };
        self.store_dead_letter(dead, "malformed", cancel).await
    }

    /// Write a dead letter, waiting out an unavailable store: a dead letter
    /// is never dropped. Should the store refuse the dead letter itself
    /// (what it carries of the message), it is stored again with less:
    /// without key, type and envelope, every control character escaped;
    /// then also without the message id (and so without an inbox row).
    async fn store_dead_letter(
        &mut self,
        mut dead: DeadLetter,
        label: &'static str,
        cancel: &CancellationToken,
    ) -> Result<()> {
        metrics::counter!(m::CONSUMER_DEAD_LETTERED_TOTAL, "consumer" => self.config.name.clone(), "reason" => label).increment(1);
        let mut attempt = 0u32;
        let mut stripped = 0u8;
        loop {
            match self.inbox.dead_letter(&self.config.name, &dead).await {
                Ok(()) => return Ok(()),
                Err(e) if e.retryable() => {
                    attempt = attempt.saturating_add(1);
                    let delay = self.config.backoff.delay(attempt, &mut self.rng);
                    warn!(error = %e, ?delay, "cannot store dead letter yet; retrying");
                    if !self.sleep(delay, cancel).await {
                        return Err(custody_core::Error::Shutdown);
                    }
                }
                Err(e) if e.is_about_message() && stripped < 2 => {
                    stripped += 1;
                    warn!(consumer = %self.config.name, message_id = ?dead.message_id, error = %e, "the database refused the dead letter itself; storing it with less of the message");
                    dead.topic = escape_text(&dead.topic).into_owned();
                    dead.key = None;
                    dead.message_type = None;
                    dead.envelope = None;
                    if stripped == 2 {
                        if let Some(id) = dead.message_id.take() {
                            dead.error = format!("{} (message id {id})", dead.error);
                        }
                    }
                    dead.error = escape_text(&format!(
                        "{}; stored without key, type and envelope because the database refused them: {e}",
                        dead.error
                    ))
                    .into_owned();
                }
                Err(e) => return Err(e),
            }
        }
    }
}
