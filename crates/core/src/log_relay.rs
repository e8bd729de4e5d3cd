//! Where a relay that publishes from the event log keeps its state: the
//! port [`LogRelayStore`], one implementation per backend
//! (`custody_sqlite::SqliteLogRelayStore`, `custody_postgres::PgLogRelayStore`)
//! in the event store's own database. The engine is
//! `custody_engine::log_relay`.
//!
//! A log relay is named (`orders-to-nats`); per name the store keeps
//!
//! - a **lease** (holder, expiry, a fencing token): at most one process
//!   publishes a relay's events at a time, and every write of a holder is
//!   refused once its token is no longer the current one;
//! - a **checkpoint**: every event of the relay's filter at or below it was
//!   acknowledged by the transport or dead-lettered (and its skip marker
//!   acknowledged). It only moves forward, in the same transaction as the
//!   journal rows that justify it;
//! - the **journal**: one row per event the relay took (number, status,
//!   attempts, parking, error, the transport's reference) — what reconcile
//!   and trace read;
//! - the **sequence heads**: the last number given per topic (see
//!   [`crate::sequence`]).
//!
//! The store decides nothing: the engine holds the lease, so it is the single
//! writer of its relay's rows and sends them whole ([`JournalWrite`]).

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Result;

/// What a log relay did with one event so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JournalStatus {
    /// Taken (and numbered), not acknowledged yet; may be parked.
    Pending,
    /// Acknowledged by the transport.
    Published,
    /// Dead-lettered; its skip marker is still to be published.
    Dead,
    /// Dead-lettered, and settled: its skip marker was acknowledged (or it
    /// had no number, so it needs none).
    DeadSettled,
}

impl JournalStatus {
    /// The stored code (0..=3).
    pub fn code(self) -> i64 {
        match self {
            JournalStatus::Pending => 0,
            JournalStatus::Published => 1,
            JournalStatus::Dead => 2,
            JournalStatus::DeadSettled => 3,
        }
    }

    /// From the stored code; an unknown code reads as pending (the relay
    /// then publishes the event again, which consumers deduplicate, rather
    /// than skipping it).
    pub fn from_code(code: i64) -> Self {
        match code {
            1 => JournalStatus::Published,
            2 => JournalStatus::Dead,
            3 => JournalStatus::DeadSettled,
            _ => JournalStatus::Pending,
        }
    }

    /// Whether the checkpoint may pass the event.
    pub fn settled(self) -> bool {
        matches!(self, JournalStatus::Published | JournalStatus::DeadSettled)
    }

    /// Whether the event was dead-lettered.
    pub fn dead(self) -> bool {
        matches!(self, JournalStatus::Dead | JournalStatus::DeadSettled)
    }

    /// `pending`, `published` or `dead` (the words of
    /// [`crate::NumberedRow::status`]).
    pub fn word(self) -> &'static str {
        match self {
            JournalStatus::Pending => "pending",
            JournalStatus::Published => "published",
            JournalStatus::Dead | JournalStatus::DeadSettled => "dead",
        }
    }
}

/// One journal row: a log relay's record of one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// The event's position in the global log.
    pub position: u64,
    /// The event's id (the message id).
    pub event_id: Uuid,
    /// The event's stream (the message key).
    pub stream: String,
    /// The topic it is published on.
    pub topic: String,
    /// Its number in the topic (see [`crate::sequence`]), once given.
    pub sequence: Option<u64>,
    /// What happened to it.
    pub status: JournalStatus,
    /// Failed publish attempts.
    pub attempts: u32,
    /// Times it was put back to be published again (reconcile's repair).
    pub republish: u32,
    /// Parked (with its stream) until then after a failure.
    pub retry_at: Option<DateTime<Utc>>,
    /// The last error, or the dead-letter reason.
    pub error: Option<String>,
    /// The id of its skip marker, once dead-lettered with a number.
    pub marker_id: Option<Uuid>,
    /// Where the transport stored it ([`crate::PublishAck::reference`]).
    pub reference: Option<String>,
    /// When the transport acknowledged it (or its skip marker).
    pub published_at: Option<DateTime<Utc>>,
}

impl JournalEntry {
    /// A fresh, pending entry.
    pub fn new(position: u64, event_id: Uuid, stream: &str, topic: &str) -> Self {
        JournalEntry {
            position,
            event_id,
            stream: stream.to_owned(),
            topic: topic.to_owned(),
            sequence: None,
            status: JournalStatus::Pending,
            attempts: 0,
            republish: 0,
            retry_at: None,
            error: None,
            marker_id: None,
            reference: None,
            published_at: None,
        }
    }
}

/// What a log relay's store holds for it, read when it takes the lease.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogRelayState {
    /// Every event of the relay's filter at or below it is settled.
    pub checkpoint: u64,
    /// The relay's producer id (its sequence stamps' first part), made
    /// when its row was created.
    pub producer: String,
    /// The last number given per topic.
    pub heads: Vec<(String, u64)>,
    /// The journal rows above the checkpoint, in position order.
    pub journal: Vec<JournalEntry>,
}

/// One fenced write of a log relay: journal rows (inserted or replaced
/// whole), new sequence heads, and the checkpoint (raised, never lowered).
#[derive(Debug, Clone, Copy, Default)]
pub struct JournalWrite<'a> {
    /// Rows to insert or replace.
    pub entries: &'a [JournalEntry],
    /// `(topic, last number given)` to store.
    pub heads: &'a [(String, u64)],
    /// The checkpoint to raise to, if any.
    pub checkpoint: Option<u64>,
}

/// The holder of a log relay's lease: the process's instance id and the
/// fencing token its lease was taken or last reloaded with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRelayHolder {
    /// The relay's name.
    pub relay: String,
    /// The instance id (unique per running process).
    pub holder: String,
    /// The token [`LogRelayStore::acquire`] returned.
    pub token: i64,
}

/// A log relay's state in the event store's database. See the module docs.
pub trait LogRelayStore: Clone + Send + Sync + 'static {
    /// Take `relay`'s lease for `holder` until `now + ttl` if it is free
    /// (never taken, released, expired), or renew it if `holder` has it.
    /// Returns the current fencing token; `None` while another holder's
    /// lease is valid. Taking the lease increments the token, and so does
    /// a change made outside the holder ([`LogRelayStore::republish`]): a
    /// holder that sees a new token reloads its state.
    fn acquire(
        &self,
        relay: &str,
        holder: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Option<i64>>> + Send;

    /// Give the lease up (graceful shutdown): a standby takes it at once.
    fn release(&self, relay: &str, holder: &str) -> impl Future<Output = Result<()>> + Send;

    /// The relay's checkpoint, producer id, heads and the journal above the
    /// checkpoint (creating the relay's row, with a new producer id, if it
    /// has none).
    fn load(&self, relay: &str) -> impl Future<Output = Result<LogRelayState>> + Send;

    /// Apply `write` in one transaction if `holder` still holds the lease
    /// with its token (checked under a lock a takeover waits for). `false`:
    /// fenced, nothing written.
    fn write(
        &self,
        holder: &LogRelayHolder,
        write: JournalWrite<'_>,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Delete settled journal rows of `relay` at or below its checkpoint
    /// last updated before `older_than`, at most `limit`; returns how many.
    fn prune(
        &self,
        relay: &str,
        older_than: DateTime<Utc>,
        limit: usize,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Journal rows of every relay for the event ids `ids`
    /// (`(relay, entry)`), for trace and reconcile.
    fn entries_by_id(
        &self,
        ids: &[Uuid],
    ) -> impl Future<Output = Result<Vec<(String, JournalEntry)>>> + Send;

    /// Journal rows of `relay` for `topic` whose event id is in
    /// `[from, to)`, for reconcile.
    fn entries_in(
        &self,
        relay: &str,
        topic: &str,
        from: Uuid,
        to: Uuid,
    ) -> impl Future<Output = Result<Vec<JournalEntry>>> + Send;

    /// Put `relay`'s journal rows of `ids` back to pending with one more
    /// republish, lower the checkpoint below the first of them and
    /// increment the token (so the holder reloads). Returns how many rows
    /// were reset.
    fn republish(&self, relay: &str, ids: &[Uuid]) -> impl Future<Output = Result<u64>> + Send;
}
