//! The history ports of reconciliation (what a producer sent, what a
//! consumer processed) and the id arithmetic both sides share. The
//! reconciliation itself is `custody_engine::reconcile`.
//!
//! Windows are defined by the **message id**: a UUIDv7 carries its creation
//! time (unix milliseconds) in its first 48 bits, so the producer's outbox and
//! the consumer's inbox (which stores only the id) put every message in the
//! same window without sharing a clock or a column. A time range is an id
//! range: `[uuid(from, 0…), uuid(to, 0…))`, which both backends serve from
//! the index they already have on the id (the outbox's `UNIQUE (id)`, the
//! inbox's primary key `(consumer, message_id)`). Ids that are not v7 are
//! windowed by the same 48 bits; both sides agree on them all the same.
//!
//! Each window is summarised by an order-independent [`IdDigest`]: the count,
//! the XOR and the wrapping sum of a 64-bit mix of every id. Equal windows are
//! confirmed from the digests alone; only unequal ones are listed id by id.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::admin::BoxFuture;
use crate::Result;

/// The 64-bit value an id contributes to a digest: a fixed, portable mix of
/// its 128 bits (splitmix64 finaliser over both halves), identical in every
/// process and on every platform.
pub fn id_hash(id: &Uuid) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let v = id.as_u128();
    let hi = (v >> 64) as u64;
    let lo = v as u64;
    mix(hi ^ mix(lo ^ 0x9e37_79b9_7f4a_7c15))
}

/// Order-independent digest of a set of ids: count, XOR and wrapping sum of
/// [`id_hash`]. Adding the same ids in any order gives the same digest; a
/// set that lacks any one id (or has one more) has a different count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdDigest {
    /// Number of ids.
    pub count: u64,
    /// XOR of their hashes.
    pub xor: u64,
    /// Wrapping sum of their hashes.
    pub sum: u64,
}

impl IdDigest {
    /// Add one id.
    pub fn add(&mut self, id: &Uuid) {
        let h = id_hash(id);
        self.count += 1;
        self.xor ^= h;
        self.sum = self.sum.wrapping_add(h);
    }

    /// Combine with the digest of a disjoint set.
    pub fn merge(&mut self, other: &IdDigest) {
        self.count += other.count;
        self.xor ^= other.xor;
        self.sum = self.sum.wrapping_add(other.sum);
    }
}

/// Milliseconds since the epoch in the id's first 48 bits (a UUIDv7's
/// creation time).
pub fn id_millis(id: &Uuid) -> i64 {
    (id.as_u128() >> 80) as i64
}

/// The smallest id whose first 48 bits are `at` (clamped to the 48-bit range).
pub fn id_at(at: DateTime<Utc>) -> Uuid {
    let ms = at.timestamp_millis().clamp(0, (1i64 << 48) - 1) as u128;
    Uuid::from_u128(ms << 80)
}

/// The id right after `id` (saturating), for keyset paging.
pub fn id_after(id: &Uuid) -> Uuid {
    Uuid::from_u128(id.as_u128().saturating_add(1))
}

/// A half-open range of ids `[from, to)`, i.e. of creation times for v7 ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// Lowest id included.
    pub from: Uuid,
    /// First id not included.
    pub to: Uuid,
}

impl IdRange {
    /// The ids created in `[from, to)`.
    pub fn between(from: DateTime<Utc>, to: DateTime<Utc>) -> IdRange {
        IdRange {
            from: id_at(from),
            to: id_at(to),
        }
    }
}

/// The producer side of reconciliation: an outbox's history.
/// Implementations: `custody_sqlite::SqliteOutbox`, `custody_postgres::PgOutbox`.
pub trait SentHistory: Send + Sync {
    /// Ids of `topic`'s outbox rows in `range` that were sent or are to be
    /// sent (every status but dead), in any order. The reconciliation
    /// engine asks for slices small enough to keep this bounded.
    fn sent_ids(
        &self,
        topic: &str,
        range: IdRange,
    ) -> impl Future<Output = Result<Vec<Uuid>>> + Send;

    /// Ids of `topic`'s dead outbox rows (status 2) in `range`, with their error.
    fn sent_dead(
        &self,
        topic: &str,
        range: IdRange,
    ) -> impl Future<Output = Result<Vec<(Uuid, String)>>> + Send;

    /// Put the rows of `ids` back to pending so the relay publishes them
    /// again, marked as a republish (a new transport dedupe id, the same
    /// message id). Returns how many rows were reset.
    fn republish(&self, ids: &[Uuid]) -> impl Future<Output = Result<u64>> + Send;

    /// This outbox's producer id and, per numbered (topic, partition), the
    /// last number given (see [`crate::sequence`]). `None`: the outbox does
    /// not number messages.
    fn sequence_heads(
        &self,
    ) -> impl Future<Output = Result<Option<(String, Vec<SequenceHead>)>>> + Send;

    /// The outbox rows holding numbers `seqs` of `topic` in `partition`
    /// (a number can have two: a relay dead letter and its skip marker).
    fn numbered(
        &self,
        topic: &str,
        partition: u32,
        seqs: &[u64],
    ) -> impl Future<Output = Result<Vec<NumberedRow>>> + Send;
}

/// The last number a producer gave in one topic and partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceHead {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The last number given (numbers start at 1).
    pub last: u64,
}

/// An outbox row found by its number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumberedRow {
    /// The number.
    pub seq: u64,
    /// The message id.
    pub id: Uuid,
    /// `pending`, `published` or `dead`.
    pub status: String,
    /// When the relay marked it published.
    pub published_at: Option<DateTime<Utc>>,
}

/// The consumer side of reconciliation: one consumer's inbox.
/// Implementations: `custody_sqlite::SqliteInbox`, `custody_postgres::PgInbox`.
pub trait ProcessedHistory: Send + Sync {
    /// Ids `consumer` recorded for `topic` in `range` (processed or
    /// dead-lettered), in any order.
    fn processed_ids(
        &self,
        consumer: &str,
        topic: &str,
        range: IdRange,
    ) -> impl Future<Output = Result<Vec<Uuid>>> + Send;

    /// Ids `consumer` dead-lettered for `topic` in `range`, with their error.
    fn processed_dead(
        &self,
        consumer: &str,
        topic: &str,
        range: IdRange,
    ) -> impl Future<Output = Result<Vec<(Uuid, String)>>> + Send;

    /// Ids waiting in `consumer`'s redrive queue (dead letters an operator
    /// sent back) for `topic` in `range`: in flight, not missing.
    fn redriving(
        &self,
        consumer: &str,
        topic: &str,
        range: IdRange,
    ) -> impl Future<Output = Result<Vec<Uuid>>> + Send;

    /// `consumer`'s floors and gaps per numbered (producer, topic,
    /// partition); see [`crate::InboxStore::progress`].
    fn sequence_progress(
        &self,
        consumer: &str,
    ) -> impl Future<Output = Result<Vec<crate::PartitionProgress>>> + Send;

    /// The numbers `consumer` recorded above `progress`'s floor, in order,
    /// each with when it was recorded, at most `limit`.
    fn numbers_above_floor(
        &self,
        consumer: &str,
        progress: &crate::PartitionProgress,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(u64, DateTime<Utc>)>>> + Send;
}

/// A producer's id and its last number per (topic, partition):
/// [`SentHistory::sequence_heads`].
pub type ProducerHeads = Option<(String, Vec<SequenceHead>)>;

/// [`SentHistory`] in a form usable as `dyn` (boxed futures): what the
/// operations port ([`crate::admin::Admin::sent`]) hands out, so the CLI
/// and the server reconcile any backend without naming its type. Every
/// [`SentHistory`] is one; `dyn DynSentHistory` is a [`SentHistory`] again.
pub trait DynSentHistory: Send + Sync {
    /// [`SentHistory::sent_ids`].
    fn sent_ids<'a>(&'a self, topic: &'a str, range: IdRange) -> BoxFuture<'a, Result<Vec<Uuid>>>;
    /// [`SentHistory::sent_dead`].
    fn sent_dead<'a>(
        &'a self,
        topic: &'a str,
        range: IdRange,
    ) -> BoxFuture<'a, Result<Vec<(Uuid, String)>>>;
    /// [`SentHistory::republish`].
    fn republish<'a>(&'a self, ids: &'a [Uuid]) -> BoxFuture<'a, Result<u64>>;
    /// [`SentHistory::sequence_heads`].
    fn sequence_heads(&self) -> BoxFuture<'_, Result<ProducerHeads>>;
    /// [`SentHistory::numbered`].
    fn numbered<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        seqs: &'a [u64],
    ) -> BoxFuture<'a, Result<Vec<NumberedRow>>>;
}

impl<T: SentHistory> DynSentHistory for T {
    fn sent_ids<'a>(&'a self, topic: &'a str, range: IdRange) -> BoxFuture<'a, Result<Vec<Uuid>>> {
        Box::pin(SentHistory::sent_ids(self, topic, range))
    }
    fn sent_dead<'a>(
        &'a self,
        topic: &'a str,
        range: IdRange,
    ) -> BoxFuture<'a, Result<Vec<(Uuid, String)>>> {
        Box::pin(SentHistory::sent_dead(self, topic, range))
    }
    fn republish<'a>(&'a self, ids: &'a [Uuid]) -> BoxFuture<'a, Result<u64>> {
        Box::pin(SentHistory::republish(self, ids))
    }
    fn sequence_heads(&self) -> BoxFuture<'_, Result<ProducerHeads>> {
        Box::pin(SentHistory::sequence_heads(self))
    }
    fn numbered<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        seqs: &'a [u64],
    ) -> BoxFuture<'a, Result<Vec<NumberedRow>>> {
        Box::pin(SentHistory::numbered(self, topic, partition, seqs))
    }
}

impl SentHistory for dyn DynSentHistory + '_ {
    async fn sent_ids(&self, topic: &str, range: IdRange) -> Result<Vec<Uuid>> {
        DynSentHistory::sent_ids(self, topic, range).await
    }
    async fn sent_dead(&self, topic: &str, range: IdRange) -> Result<Vec<(Uuid, String)>> {
        DynSentHistory::sent_dead(self, topic, range).await
    }
    async fn republish(&self, ids: &[Uuid]) -> Result<u64> {
        DynSentHistory::republish(self, ids).await
    }
    async fn sequence_heads(&self) -> Result<Option<(String, Vec<SequenceHead>)>> {
        DynSentHistory::sequence_heads(self).await
    }
    async fn numbered(
        &self,
        topic: &str,
        partition: u32,
        seqs: &[u64],
    ) -> Result<Vec<NumberedRow>> {
        DynSentHistory::numbered(self, topic, partition, seqs).await
    }
}

/// A number a consumer recorded and when: [`ProcessedHistory::numbers_above_floor`].
pub type RecordedNumber = (u64, DateTime<Utc>);

/// [`ProcessedHistory`] in a form usable as `dyn`; see [`DynSentHistory`].
pub trait DynProcessedHistory: Send + Sync {
    /// [`ProcessedHistory::processed_ids`].
    fn processed_ids<'a>(
        &'a self,
        consumer: &'a str,
        topic: &'a str,
        range: IdRange,
    ) -> BoxFuture<'a, Result<Vec<Uuid>>>;
    /// [`ProcessedHistory::processed_dead`].
    fn processed_dead<'a>(
        &'a self,
        consumer: &'a str,
        topic: &'a str,
        range: IdRange,
    ) -> BoxFuture<'a, Result<Vec<(Uuid, String)>>>;
    /// [`ProcessedHistory::redriving`].
    fn redriving<'a>(
        &'a self,
        consumer: &'a str,
        topic: &'a str,
        range: IdRange,
    ) -> BoxFuture<'a, Result<Vec<Uuid>>>;
    /// [`ProcessedHistory::sequence_progress`].
    fn sequence_progress<'a>(
        &'a self,
        consumer: &'a str,
    ) -> BoxFuture<'a, Result<Vec<crate::PartitionProgress>>>;
    /// [`ProcessedHistory::numbers_above_floor`].
    fn numbers_above_floor<'a>(
        &'a self,
        consumer: &'a str,
        progress: &'a crate::PartitionProgress,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<RecordedNumber>>>;
}

impl<T: ProcessedHistory> DynProcessedHistory for T {
    fn processed_ids<'a>(
        &'a self,
        consumer: &'a str,
        topic: &'a str,
        range: IdRange,
    ) -> BoxFuture<'a, Result<Vec<Uuid>>> {
        Box::pin(ProcessedHistory::processed_ids(
            self, consumer, topic, range,
        ))
    }
    fn processed_dead<'a>(
        &'a self,
        consumer: &'a str,
        topic: &'a str,
        range: IdRange,
    ) -> BoxFuture<'a, Result<Vec<(Uuid, String)>>> {
        Box::pin(ProcessedHistory::processed_dead(
            self, consumer, topic, range,
        ))
    }
    fn redriving<'a>(
        &'a self,
        consumer: &'a str,
        topic: &'a str,
        range: IdRange,
    ) -> BoxFuture<'a, Result<Vec<Uuid>>> {
        Box::pin(ProcessedHistory::redriving(self, consumer, topic, range))
    }
    fn sequence_progress<'a>(
        &'a self,
        consumer: &'a str,
    ) -> BoxFuture<'a, Result<Vec<crate::PartitionProgress>>> {
        Box::pin(ProcessedHistory::sequence_progress(self, consumer))
    }
    fn numbers_above_floor<'a>(
        &'a self,
        consumer: &'a str,
        progress: &'a crate::PartitionProgress,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<RecordedNumber>>> {
        Box::pin(ProcessedHistory::numbers_above_floor(
            self, consumer, progress, limit,
        ))
    }
}

impl ProcessedHistory for dyn DynProcessedHistory + '_ {
    async fn processed_ids(
        &self,
        consumer: &str,
        topic: &str,
        range: IdRange,
    ) -> Result<Vec<Uuid>> {
        DynProcessedHistory::processed_ids(self, consumer, topic, range).await
    }
    async fn processed_dead(
        &self,
        consumer: &str,
        topic: &str,
        range: IdRange,
    ) -> Result<Vec<(Uuid, String)>> {
        DynProcessedHistory::processed_dead(self, consumer, topic, range).await
    }
    async fn redriving(&self, consumer: &str, topic: &str, range: IdRange) -> Result<Vec<Uuid>> {
        DynProcessedHistory::redriving(self, consumer, topic, range).await
    }
    async fn sequence_progress(&self, consumer: &str) -> Result<Vec<crate::PartitionProgress>> {
        DynProcessedHistory::sequence_progress(self, consumer).await
    }
    async fn numbers_above_floor(
        &self,
        consumer: &str,
        progress: &crate::PartitionProgress,
        limit: usize,
    ) -> Result<Vec<(u64, DateTime<Utc>)>> {
        DynProcessedHistory::numbers_above_floor(self, consumer, progress, limit).await
    }
}

/// What to reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileQuery {
    /// The topic.
    pub topic: String,
    /// The consumer's name in its inbox.
    pub consumer: String,
    /// Messages created at or after this time.
    pub from: DateTime<Utc>,
    /// Messages created before this time.
    pub to: DateTime<Utc>,
    /// Window length (digests are compared per window).
    pub window: Duration,
}

/// One window of a reconciliation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowReport {
    /// Start of the window (inclusive).
    pub start: DateTime<Utc>,
    /// End of the window (exclusive).
    pub end: DateTime<Utc>,
    /// Messages the producer sent in it (dead ones not counted).
    pub sent: u64,
    /// Messages the consumer recorded in it (processed or dead-lettered).
    pub processed: u64,
    /// Whether both digests are equal.
    pub matching: bool,
}

/// A dead-lettered message: accounted for, not missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadId {
    /// Message id.
    pub id: Uuid,
    /// `producer` (the relay gave up) or `consumer`.
    pub side: String,
    /// The stored reason.
    pub error: String,
}

/// The result of a reconciliation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    /// Topic.
    pub topic: String,
    /// Consumer.
    pub consumer: String,
    /// Range start.
    pub from: DateTime<Utc>,
    /// Range end.
    pub to: DateTime<Utc>,
    /// Window length in seconds.
    pub window_secs: u64,
    /// Windows that had messages on either side.
    pub windows_checked: u64,
    /// Of those, windows whose digests matched.
    pub matching: u64,
    /// Of those, windows examined id by id.
    pub mismatching: u64,
    /// Messages sent in the range.
    pub sent: u64,
    /// Messages recorded by the consumer in the range.
    pub processed: u64,
    /// Sent, never processed, not dead-lettered, not being redriven.
    pub missing: Vec<Uuid>,
    /// Processed, never sent by this producer (or pruned from its history).
    pub unexpected: Vec<Uuid>,
    /// Dead-lettered on either side (accounted for).
    pub dead_lettered: Vec<DeadId>,
    /// In the consumer's redrive queue (accounted for, in flight).
    pub redriving: Vec<Uuid>,
    /// Per-window detail, windows with messages only, in time order.
    pub windows: Vec<WindowReport>,
    /// Messages of the topic the producer sent at or after `to`, left out of
    /// the check (with the CLI's default `--settle 1m`: the last minute's,
    /// still in flight). Reports written before this field read as 0.
    #[serde(default)]
    pub left_out: u64,
}

impl ReconcileReport {
    /// Nothing missing and nothing unexpected. A report that
    /// [compared nothing](Self::compared_nothing) is clean too: check that first.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty()
    }

    /// Neither side had a message of the topic in the range (nothing sent,
    /// processed, dead-lettered or being redriven): the check proves
    /// nothing, and must not be reported as OK (docs/ARCHITECTURE.md invariant 8).
    pub fn compared_nothing(&self) -> bool {
        self.sent == 0
            && self.processed == 0
            && self.dead_lettered.is_empty()
            && self.redriving.is_empty()
    }
}

/// Start (ms) of the window of length `window_ms` that holds `ms`.
pub fn window_start(ms: i64, window_ms: i64) -> i64 {
    ms.div_euclid(window_ms.max(1)) * window_ms.max(1)
}

/// Digests of `ids` per window start (ms).
pub fn digests_by_window<'a>(
    ids: impl IntoIterator<Item = &'a Uuid>,
    window_ms: i64,
    into: &mut BTreeMap<i64, IdDigest>,
) {
    for id in ids {
        into.entry(window_start(id_millis(id), window_ms))
            .or_default()
            .add(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn digest(ids: &[Uuid]) -> IdDigest {
        let mut d = IdDigest::default();
        for id in ids {
            d.add(id);
        }
        d
    }

    proptest! {
        #[test]
        fn digest_is_order_independent(raw in proptest::collection::vec(any::<u128>(), 0..200), seed in any::<u64>()) {
            let ids: Vec<Uuid> = raw.iter().map(|r| Uuid::from_u128(*r)).collect();
            let mut shuffled = ids.clone();
            // deterministic shuffle from the seed
            let mut s = seed | 1;
            for i in (1..shuffled.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            prop_assert_eq!(digest(&ids), digest(&shuffled));
        }

        #[test]
        fn any_single_missing_id_changes_the_digest(raw in proptest::collection::hash_set(any::<u128>(), 1..200), pick in any::<prop::sample::Index>()) {
            let ids: Vec<Uuid> = raw.iter().map(|r| Uuid::from_u128(*r)).collect();
            let gone = pick.index(ids.len());
            let mut fewer = ids.clone();
            fewer.remove(gone);
            prop_assert_ne!(digest(&ids), digest(&fewer));
        }

        #[test]
        fn a_swapped_id_changes_the_digest(raw in proptest::collection::hash_set(any::<u128>(), 1..100), other in any::<u128>(), pick in any::<prop::sample::Index>()) {
            let ids: Vec<Uuid> = raw.iter().map(|r| Uuid::from_u128(*r)).collect();
            prop_assume!(!raw.contains(&other));
            let mut swapped = ids.clone();
            let i = pick.index(ids.len());
            swapped[i] = Uuid::from_u128(other);
            // same count: the xor or the sum must tell them apart
            prop_assert_ne!(digest(&ids), digest(&swapped));
        }

        #[test]
        fn merge_equals_adding(a in proptest::collection::vec(any::<u128>(), 0..50), b in proptest::collection::vec(any::<u128>(), 0..50)) {
            let a: Vec<Uuid> = a.into_iter().map(Uuid::from_u128).collect();
            let b: Vec<Uuid> = b.into_iter().map(Uuid::from_u128).collect();
            let mut m = digest(&a);
            m.merge(&digest(&b));
            let all: Vec<Uuid> = a.iter().chain(b.iter()).copied().collect();
            prop_assert_eq!(m, digest(&all));
        }
    }

    #[test]
    fn v7_ids_window_by_their_creation_time() {
        let at = DateTime::from_timestamp_millis(1_700_000_123_456).unwrap_or_default();
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, 1_700_000_123, 456_000_000);
        let id = Uuid::new_v7(ts);
        assert_eq!(id_millis(&id), at.timestamp_millis());
        let r = IdRange::between(at, at + chrono::Duration::milliseconds(1));
        assert!(r.from <= id && id < r.to);
        assert_eq!(window_start(id_millis(&id), 3_600_000) % 3_600_000, 0);
    }
}
