use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{Message, PublishAck, Result};

/// A committed outbox row as the relay sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    /// Position in the outbox log, assigned at insert.
    pub position: i64,
    /// Partition of the key (see [`crate::partition_for`]).
    pub partition: u32,
    /// Failed publish attempts so far.
    pub attempts: u32,
    /// Times the row was put back to pending by a repair or a redrive
    /// (0: first publish); see [`crate::Publisher::publish_again`].
    pub republish: u32,
    /// The record's number in its partition (see [`crate::sequence`]), once
    /// [`OutboxStore::assign_sequences`] gave it one; kept across republishes.
    pub sequence: Option<u64>,
    /// The message.
    pub message: Message,
}

/// The end of every [`OutboxStore::assign_sequences`]: give each unnumbered
/// record of `records` the number `given(position)` the store stored for it,
/// and remove those it numbered none (their partition's lease is gone, or
/// the row was numbered or published meanwhile: not this relay's to
/// publish now). Records already numbered stay as they are. Returns how
/// many were removed.
pub fn keep_numbered(
    relay: &str,
    records: &mut Vec<OutboxRecord>,
    given: impl Fn(i64) -> Option<u64>,
) -> usize {
    let before = records.len();
    records.retain_mut(|r| {
        if r.sequence.is_some() {
            return true;
        }
        r.sequence = given(r.position).filter(|seq| *seq > 0);
        r.sequence.is_some()
    });
    let dropped = before - records.len();
    if dropped > 0 {
        tracing::debug!(
            relay,
            dropped,
            "unnumbered rows of partitions no longer leased (or no longer pending) left to their new holder"
        );
    }
    dropped
}

/// The relay's view of an outbox: leases on partitions, the next publishable
/// batch, and the outcome of each publish.
///
/// Implementations: `custody_sqlite::SqliteOutbox`, `custody_postgres::PgOutbox`,
/// `custody_testkit::memory::MemoryOutbox`. Every capability is a required
/// method except [`OutboxStore::fetch_batch_excluding`], whose provided body
/// is correct for every store (only less efficient); the fair-share decision
/// of [`OutboxStore::acquire_leases`] is [`crate::plan_leases`].
pub trait OutboxStore: Clone + Send + Sync + 'static {
    /// Number of partitions keys are hashed into.
    fn partitions(&self) -> u32;

    /// Heartbeat `relay` and take its fair share of the partitions
    /// (`ceil(partitions / live relays)`): renew the leases it holds, claim
    /// free or expired ones, give back any above its share. Leases not
    /// renewed within `ttl` expire, so partitions of a dead relay move on.
    /// Returns the partitions `relay` holds now, sorted.
    fn acquire_leases(
        &self,
        relay: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<u32>>> + Send;

    /// Give back every lease of `relay` (graceful shutdown).
    fn release_leases(&self, relay: &str) -> impl Future<Output = Result<()>> + Send;

    /// The next messages to publish from `partitions`, in position order, at
    /// most `limit`.
    ///
    /// Reads pending rows by their state, never past a cursor, so a row
    /// whose transaction commits after higher positions were returned is
    /// returned by a later call: nothing is skipped, and a key's messages go
    /// out in the order they commit. (A store must not wait for transactions
    /// in flight: on PostgreSQL a transaction-id guard would make the relay
    /// wait for every transaction of the server.) Must leave out every
    /// message whose key has an earlier pending message that is parked
    /// (`retry_at > now`): a failing message holds back its own key and no
    /// other.
    fn fetch_batch(
        &self,
        partitions: &[u32],
        limit: usize,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<OutboxRecord>>> + Send;

    /// [`OutboxStore::fetch_batch`] leaving out the rows at the positions
    /// `in_flight` (still pending: the pipelined relay is publishing or
    /// marking them): the first `limit` of the others, in position order.
    ///
    /// The default fetches `limit + in_flight.len()` rows and drops the
    /// in-flight ones; a store that can leave them out in its query should,
    /// so they are neither read nor sent twice.
    fn fetch_batch_excluding(
        &self,
        partitions: &[u32],
        limit: usize,
        in_flight: &[i64],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<OutboxRecord>>> + Send {
        async move {
            let mut batch = self
                .fetch_batch(partitions, limit.saturating_add(in_flight.len()), now)
                .await?;
            let mut skip = in_flight.to_vec();
            skip.sort_unstable();
            batch.retain(|r| skip.binary_search(&r.position).is_err());
            // a prefix in position order: no key loses an earlier message and keeps a later one
            batch.truncate(limit);
            Ok(batch)
        }
    }

    /// This outbox's producer id, the first part of every `(producer,
    /// partition, sequence)` stamp (see [`crate::sequence`]). A store that
    /// returns `None` publishes unnumbered messages (the relay then never
    /// calls [`OutboxStore::assign_sequences`]); say so in its docs.
    fn producer_id(&self) -> impl Future<Output = Result<Option<String>>> + Send;

    /// Number every record of `records` that has no sequence yet with the
    /// next numbers of its partition, in position order, and store the
    /// numbers (in the rows, so a republish keeps them, and as the
    /// partition's next number, under `relay`'s lease). Records of
    /// partitions `relay` no longer leases are removed from `records`: a
    /// relay that lost a lease must not number (or publish) that
    /// partition's new messages.
    fn assign_sequences(
        &self,
        relay: &str,
        records: &mut Vec<OutboxRecord>,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Mark messages published after the transport's durable ack, keeping
    /// each ack's [`PublishAck::reference`] (stream and sequence) for
    /// tracing. Only rows in partitions `relay` still leases are marked (a
    /// relay that lost its lease is fenced off); returns how many were marked.
    fn mark_published(
        &self,
        relay: &str,
        acked: &[(i64, PublishAck)],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Record a failed attempt: increment `attempts`, keep `error`, park the
    /// message (and so its key) until `retry_at`. Fenced like
    /// [`OutboxStore::mark_published`]: only a pending row in a partition
    /// `relay` still leases (unexpired at `now`) is written; otherwise
    /// nothing is, and the outcome says why.
    fn record_failure(
        &self,
        relay: &str,
        position: i64,
        error: &str,
        retry_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<RowWrite>> + Send;

    /// Move a message to the dead-letter table with `error`; its key flows on.
    /// A numbered message leaves a skip marker ([`crate::sequence::SKIP_TYPE`])
    /// with its number in its place, pending, so consumers account for the
    /// number instead of seeing a gap. Fenced like
    /// [`OutboxStore::record_failure`]: a relay that lost the row's
    /// partition neither dead-letters it nor writes a skip marker (the new
    /// holder may be publishing it).
    fn dead_letter(
        &self,
        relay: &str,
        position: i64,
        error: &str,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<RowWrite>> + Send;

    /// Delete published (status 1) and dead-lettered (status 2) rows of `partitions` whose
    /// published_at (or, for dead rows, enqueued_at) is older than `older_than`, at most `limit`
    /// rows, in one short transaction. Never deletes a pending row, nor a row an embedded reader
    /// (custody_checkpoint) has not read yet. Returns how many rows were deleted.
    ///
    /// Call it repeatedly (e.g. from the relay, on the partitions it leases) until it returns
    /// less than `limit`. A reader that has no checkpoint yet does not hold pruning back.
    fn prune(
        &self,
        partitions: &[u32],
        older_than: DateTime<Utc>,
        limit: usize,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Resolve when new messages may have been committed, or after `timeout`.
    /// (PostgreSQL: LISTEN/NOTIFY; SQLite: an in-process signal.)
    fn wait_for_new(&self, timeout: Duration) -> impl Future<Output = ()> + Send;
}

/// What a relay's write about one outbox row
/// ([`OutboxStore::record_failure`], [`OutboxStore::dead_letter`]) did.
/// Only [`RowWrite::Written`] changed anything; the others are outcomes, not
/// errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum RowWrite {
    /// The row was pending in a partition the relay leases, and was written.
    Written,
    /// Nothing was written: the row's partition is not (or no longer)
    /// leased by this relay. Its holder publishes, parks or dead-letters the
    /// row; the relay renews its leases before going on.
    Fenced,
    /// Nothing was written: the row is no longer pending (published,
    /// dead-lettered or pruned meanwhile).
    NotPending,
}

/// A message that could not be published or processed, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message id, if known (a payload too broken to read has none).
    pub message_id: Option<Uuid>,
    /// Who gave up on it: `relay` or `consumer:<name>`.
    pub origin: String,
    /// Topic.
    pub topic: String,
    /// Ordering key, if known.
    pub key: Option<String>,
    /// Message type, if known.
    pub message_type: Option<String>,
    /// Raw payload.
    pub payload: Vec<u8>,
    /// Full envelope as JSON where it was readable, for redrive.
    pub envelope: Option<String>,
    /// Why it is here; says what to do.
    pub error: String,
    /// Attempts made.
    pub attempts: u32,
    /// When it was dead-lettered.
    pub dead_at: DateTime<Utc>,
}

impl DeadLetter {
    /// The `(producer, partition, sequence)` stamp of the dead message, when
    /// its envelope was readable and numbered: the inbox row written with the
    /// dead letter carries it, so the number counts as accounted for.
    pub fn sequence(&self) -> Option<crate::Sequence> {
        let envelope = self.envelope.as_deref()?;
        let message: Message = serde_json::from_str(envelope).ok()?;
        crate::Sequence::of(&message)
    }
}

/// Result of recording a message in an inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxOutcome {
    /// First time this consumer sees the message: run the handler.
    New,
    /// Already processed (or dead-lettered) by this consumer: skip it.
    Duplicate,
}

/// A consumer's idempotent inbox, in the consumer's own database.
///
/// Every capability the consumer engine uses is a required method: an
/// implementation that cannot provide one (the memory model keeps no
/// sequence floors) writes down what it does instead, so a new backend
/// never compiles while silently not pruning, compacting or redriving. The
/// one provided method, [`InboxStore::record_all`], is correct for every
/// store, only slower.
///
/// The consumer engine opens a transaction, records the message id, runs the
/// handler in the same transaction and commits: the effect and the inbox row
/// exist together or not at all.
pub trait InboxStore: Clone + Send + Sync + 'static {
    /// The backend's transaction (e.g. `sqlx::Transaction<'static, Sqlite>`);
    /// the handler runs its own statements on it.
    type Tx: Send + 'static;

    /// Begin a transaction.
    fn begin(&self) -> impl Future<Output = Result<Self::Tx>> + Send;

    /// Insert `(consumer, message.id)` into the inbox inside `tx`. A message
    /// seen before is [`InboxOutcome::Duplicate`] (and its duplicate count is
    /// incremented in the same transaction). A numbered message (see
    /// [`crate::sequence`]) is recorded with its `(producer, partition,
    /// sequence)`, and one at or below the consumer's floor for that
    /// partition is a duplicate too (its row may have been compacted).
    fn record(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        message: &Message,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<InboxOutcome>> + Send;

    /// [`InboxStore::record`] each of `messages`, in order, inside `tx`: one
    /// outcome per message, exactly as that many calls would give. The
    /// consumer records a run of a group's messages ahead of their handlers
    /// with it; backends with a network round trip per statement override it
    /// to record them in one. The default calls `record` for each.
    fn record_all(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        messages: &[&Message],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<InboxOutcome>>> + Send {
        async move {
            let mut outcomes = Vec::with_capacity(messages.len());
            for message in messages {
                outcomes.push(self.record(tx, consumer, message, now).await?);
            }
            Ok(outcomes)
        }
    }

    /// Commit.
    fn commit(&self, tx: Self::Tx) -> impl Future<Output = Result<()>> + Send;

    /// Poison detection: record that run `run` of `consumer` (one consumer
    /// process, identified by an id it makes at start) is about to run the
    /// handler on each of `ids` (`alone`: on that one message only, not in a
    /// group), in a transaction of its own that commits before the handler
    /// runs, so the record survives a crash of the process. Returns what
    /// earlier runs left, per id in the order given. Starting an id again
    /// in the same run counts nothing (retries after transient errors are
    /// not crashes); a start left by another run counts as a crash of the
    /// message only if that run started it alone.
    fn start_attempts(
        &self,
        consumer: &str,
        run: Uuid,
        ids: &[Uuid],
        alone: bool,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<Attempt>>> + Send;

    /// Forget the started attempts of `ids` inside `tx`: called in the
    /// handler's transaction right before it commits (and in a transaction
    /// of its own after a dead letter is stored), so the attempts count as
    /// finished exactly when the effect (or the dead letter) is durable.
    fn finish_attempts(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        ids: &[Uuid],
    ) -> impl Future<Output = Result<()>> + Send;

    /// Whether `consumer` has an inbox row for message `id` (processed,
    /// or dead-lettered with its id). The consumer asks before it
    /// dead-letters a malformed copy under a claimed id: a copy of a
    /// message already settled is stored without the id, so the record of
    /// what happened to the real message (`custody trace`) is never
    /// contradicted by a forgery.
    fn is_recorded(&self, consumer: &str, id: Uuid) -> impl Future<Output = Result<bool>> + Send;

    /// In one transaction of its own: store the dead letter and, when the
    /// message id is known, an inbox row for it, so a redelivery is skipped.
    fn dead_letter(
        &self,
        consumer: &str,
        dead: &DeadLetter,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Up to `limit` messages an operator sent back to `consumer` from its
    /// dead letters (`custody dlq redrive`), oldest first. Their inbox rows
    /// were deleted by the redrive, so [`InboxStore::record`] sees them as
    /// new.
    fn redrives(
        &self,
        consumer: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Redrive>>> + Send;

    /// Remove redrive `seq` from the queue inside `tx` (the handler's
    /// transaction), so the message is handed to the handler exactly once.
    /// Called before the message is recorded in `tx`: while its queue row
    /// is visible, [`InboxStore::record`] reports every other delivery of
    /// the message as a duplicate (the queue row is the redrive's one
    /// exactly-once token; a replay arriving first must not use it up).
    fn finish_redrive(
        &self,
        tx: &mut Self::Tx,
        seq: i64,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Remove redrive `seq` in a transaction of its own (after the message
    /// was dead-lettered again).
    fn drop_redrive(&self, seq: i64) -> impl Future<Output = Result<()>> + Send;

    /// Delete at most `limit` of `consumer`'s inbox rows recorded before
    /// `older_than`, in one short transaction, keeping rows of messages
    /// that still have a dead letter (so a late redelivery is still
    /// skipped). Returns how many were deleted. Rows older than the
    /// transport's redelivery horizon are no longer needed for dedupe;
    /// reconciliation needs them for its window, so the retention must
    /// cover it.
    fn prune(
        &self,
        consumer: &str,
        older_than: DateTime<Utc>,
        limit: usize,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// `consumer`'s progress through every producer partition it has seen
    /// numbered messages of (see [`crate::sequence`]): floor, highest
    /// sequence, holes. An inbox that keeps no sequence floors returns
    /// none (and says so in its docs).
    fn progress(
        &self,
        consumer: &str,
    ) -> impl Future<Output = Result<Vec<crate::PartitionProgress>>> + Send;

    /// Raise `consumer`'s floor of one producer partition past numbers that
    /// will never arrive (see [`crate::sequence::plan_acceptance`] for what
    /// is refused), in one transaction with an audit record of who, when,
    /// which numbers and why (`custody_gap_accepted`). A message whose
    /// number was accepted and that arrives after all is not dropped: the
    /// inbox dead-letters it (its id was never recorded). An inbox without
    /// sequence floors refuses with a non-retryable error
    /// ([`crate::Error::store`]) that says so.
    fn accept_gap(
        &self,
        consumer: &str,
        gap: &crate::GapAcceptance,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<crate::AcceptedGap>> + Send;

    /// Fold `consumer`'s inbox rows into its per-partition floors: move each
    /// floor up over the run of recorded sequences above it (reading at most
    /// `limit` of them per partition) and delete the inbox rows at or below
    /// the floor that were recorded before `keep_after` (rows inside a
    /// reconciliation window stay for `custody reconcile`). Each partition
    /// in one short transaction. Dedupe stays exact:
    /// [`InboxStore::record`] reports a numbered message at or below the
    /// floor as a duplicate. An inbox without sequence floors has nothing
    /// to fold and returns an empty [`crate::Compaction`].
    fn compact(
        &self,
        consumer: &str,
        keep_after: DateTime<Utc>,
        limit: usize,
    ) -> impl Future<Output = Result<crate::Compaction>> + Send;
}

/// What earlier consumer runs left of a message's handler attempts (see
/// [`InboxStore::start_attempts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attempt {
    /// Another run started the message and never finished it: it may be
    /// what stopped that run. The consumer applies it alone.
    pub unfinished: bool,
    /// Runs that started the message alone and never finished it: crashes
    /// (kills, hangs) attributable to this message.
    pub crashes: u32,
}

/// A dead-lettered message sent back to its consumer by an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redrive {
    /// Queue sequence, passed to [`InboxStore::finish_redrive`].
    pub seq: i64,
    /// The message as it was dead-lettered.
    pub message: Message,
}

impl Redrive {
    /// Read the redrive-queue rows `(seq, envelope JSON)` a store fetched
    /// for [`InboxStore::redrives`]: the readable ones, and the sequences of
    /// rows whose envelope does not read (`custody dlq redrive` checked it,
    /// so a hand-edited row), logged here, which the store drops.
    pub fn read_queue(rows: Vec<(i64, String)>) -> (Vec<Redrive>, Vec<i64>) {
        let mut out = Vec::with_capacity(rows.len());
        let mut unreadable = Vec::new();
        for (seq, envelope) in rows {
            match serde_json::from_str::<Message>(&envelope) {
                Ok(message) => out.push(Redrive { seq, message }),
                Err(e) => {
                    tracing::error!(seq, error = %e, "redrive row has an unreadable envelope; dropping it");
                    unreadable.push(seq);
                }
            }
        }
        (out, unreadable)
    }
}

/// Why a handler did not apply a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// May work later (database busy, downstream down): retried with backoff.
    #[error("transient: {0}")]
    Transient(#[source] crate::BoxError),
    /// Will never work for this message: dead-lettered at once.
    #[error("permanent: {0}")]
    Permanent(#[source] crate::BoxError),
    /// The consumer has no handler for this message type: dead-lettered.
    #[error(
        "unknown message type {0:?}; add a handler for it or stop routing it to this consumer"
    )]
    UnknownType(String),
}

impl HandlerError {
    /// A transient error from anything printable.
    pub fn transient(e: impl Into<crate::BoxError>) -> Self {
        HandlerError::Transient(e.into())
    }
    /// A permanent error from anything printable.
    pub fn permanent(e: impl Into<crate::BoxError>) -> Self {
        HandlerError::Permanent(e.into())
    }
}

impl From<crate::Error> for HandlerError {
    /// Custody errors keep their classification: a decode error is
    /// permanent, a lost connection transient.
    fn from(e: crate::Error) -> Self {
        if e.retryable() {
            HandlerError::Transient(Box::new(e))
        } else {
            HandlerError::Permanent(Box::new(e))
        }
    }
}

/// Applies one message inside the consumer's transaction `Tx`.
///
/// Everything the handler writes through `tx` commits together with the inbox
/// row; it may also enqueue outbox messages on the same transaction
/// (derived events).
pub trait Handler<Tx>: Send + Sync + 'static {
    /// Apply `message`.
    fn handle(
        &self,
        tx: &mut Tx,
        message: &Message,
    ) -> impl Future<Output = std::result::Result<(), HandlerError>> + Send;
}
