//! The event log as outbox: a relay that publishes from an event store.
//!
//! An event-sourced service needs no second outbox table. [`LogOutbox`]
//! presents the global log (or some categories of it) to the ordinary
//! [`Relay`] as an [`OutboxStore`], so the log relay keeps everything the
//! polling relay promises — batches and pipelining, the durable ack before
//! anything moves, backoff per stream and the circuit breaker, dead letters
//! with a skip marker, sequence stamps, metrics — with no parallel copy of
//! that logic. What differs lives here:
//!
//! - **Reading.** Events are read with [`EventStore::read_all`] from the
//!   relay's checkpoint, never past the store's gap-free head, so an event
//!   whose transaction commits late is still read (docs/ARCHITECTURE.md
//!   invariant 5). Each event becomes a message with
//!   [`RecordedEvent::to_message`]: the event id is the message id (the
//!   consumer's inbox dedupes by it) and the stream is the key, so position
//!   order within a stream is per-key order.
//! - **The checkpoint** only moves over events that are settled (the
//!   transport acknowledged them, or they were dead-lettered and their skip
//!   marker acknowledged), written in the same transaction as the journal
//!   rows that say so ([`custody_core::log_relay`]). A crash between a
//!   publish and that write republishes; the transport and the inbox
//!   deduplicate by id.
//! - **One active relay per name**: the relay's one partition is a lease in
//!   the event store's database ([`LogRelayStore::acquire`]); a second
//!   process with the same relay name waits as a standby and takes over
//!   when the lease expires or is released. Every write is fenced by the
//!   lease's token.
//!
//! ```
//! use custody_engine::log_relay::LogRelayConfig;
//! let config = LogRelayConfig::new("orders-out")
//!     .category("order")
//!     .topic_for("order", "orders");
//! assert_eq!(config.topic_of("order"), "orders");
//! assert_eq!(config.topic_of("invoice"), "invoice");
//! ```

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use custody_core::event::{EventStore, LogFilter, RecordedEvent};
use custody_core::log_relay::{
    JournalEntry, JournalStatus, JournalWrite, LogRelayHolder, LogRelayStore,
};
use custody_core::sequence::{SKIPPED_HEADER, SKIP_TYPE};
use custody_core::{
    Error, Message, MessageKind, OutboxRecord, OutboxStore, PublishAck, Publisher, Result, RowWrite,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use uuid::Uuid;

use crate::metric_definitions as m;
use crate::{Relay, RelayConfig};

/// Events read per page while looking for a batch.
const PAGE: usize = 512;
/// Pages one fetch reads at most (a long run of settled events above a
/// parked one is passed over in bounded steps).
const MAX_PAGES: usize = 64;

/// What a log relay publishes and under which name it keeps its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LogRelayConfig {
    /// The relay's name: its lease, checkpoint, journal and numbering.
    /// Two processes with the same name never publish at the same time.
    pub name: String,
    /// Categories to publish (empty: the whole log).
    pub categories: Vec<String>,
    /// Topic per category.
    pub topics: BTreeMap<String, String>,
    /// Topic of a category not in `topics` (none: the category's name).
    pub default_topic: Option<String>,
}

impl Default for LogRelayConfig {
    fn default() -> Self {
        LogRelayConfig::new("events")
    }
}

impl LogRelayConfig {
    /// A relay named `name` publishing the whole log, each category on the
    /// topic of its name.
    pub fn new(name: impl Into<String>) -> Self {
        LogRelayConfig {
            name: name.into(),
            categories: Vec::new(),
            topics: BTreeMap::new(),
            default_topic: None,
        }
    }

    /// Publish `category` (call once per category; none: the whole log).
    pub fn category(mut self, category: impl Into<String>) -> Self {
        self.categories.push(category.into());
        self
    }

    /// Publish `category`'s events on `topic`.
    pub fn topic_for(mut self, category: impl Into<String>, topic: impl Into<String>) -> Self {
        self.topics.insert(category.into(), topic.into());
        self
    }

    /// Publish every category without its own topic on `topic`.
    pub fn default_topic(mut self, topic: impl Into<String>) -> Self {
        self.default_topic = Some(topic.into());
        self
    }

    /// The topic `category`'s events go to.
    pub fn topic_of<'a>(&'a self, category: &'a str) -> &'a str {
        self.topics
            .get(category)
            .map(String::as_str)
            .or(self.default_topic.as_deref())
            .unwrap_or(category)
    }

    /// The filter the relay reads the log with.
    pub fn filter(&self) -> LogFilter {
        LogFilter {
            categories: self.categories.clone(),
            types: Vec::new(),
        }
    }

    /// Check the name: 1 to 255 bytes without NUL.
    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty() || self.name.len() > 255 || self.name.contains('\0') {
            return Err(Error::Config(format!(
                "log relay name {:?} must be 1 to 255 bytes without NUL (e.g. \"orders-to-nats\")",
                self.name
            )));
        }
        Ok(())
    }
}

/// A relay publishing `events`' log through `publisher`, its state in
/// `state`: the ordinary [`Relay`] over a [`LogOutbox`]. Run it with
/// [`Relay::run`]; only one process per [`LogRelayConfig::name`] publishes
/// at a time.
pub fn log_relay<E: EventStore, S: LogRelayStore, P: Publisher>(
    events: E,
    state: S,
    publisher: P,
    config: LogRelayConfig,
    relay: RelayConfig,
) -> Result<Relay<LogOutbox<E, S>, P>> {
    Ok(Relay::new(
        LogOutbox::new(events, state, config)?,
        publisher,
        relay,
    ))
}

/// The event log seen as an outbox with one partition (see the module
/// docs). Cheap to clone; clones share their view.
#[derive(Clone)]
pub struct LogOutbox<E, S> {
    events: E,
    state: S,
    config: Arc<LogRelayConfig>,
    filter: Arc<LogFilter>,
    view: Arc<Mutex<View>>,
}

/// What the holder knows above the checkpoint. Only the lease holder has
/// one; it is rebuilt from the store whenever the lease's token changes.
#[derive(Debug, Default)]
struct View {
    /// The lease this view was loaded under (`None`: not held).
    holder: Option<LogRelayHolder>,
    checkpoint: u64,
    /// Every event of the filter up to here is in `window` or settled at or
    /// below the checkpoint.
    scanned_to: u64,
    producer: String,
    heads: BTreeMap<String, u64>,
    /// Journal entries above the checkpoint, by position.
    window: BTreeMap<u64, JournalEntry>,
}

impl View {
    /// The highest position the checkpoint may move to: just below the
    /// first unsettled event, or everything scanned.
    ///
    /// Computed as if the entries of `changed` replaced theirs (a write not
    /// made yet: the view changes only once it is stored).
    fn reachable_with(&self, changed: &BTreeMap<u64, JournalEntry>) -> u64 {
        let first_open = self
            .window
            .values()
            .map(|e| changed.get(&e.position).unwrap_or(e))
            .find(|e| !e.status.settled())
            .map(|e| e.position - 1);
        first_open.unwrap_or(self.scanned_to).max(self.checkpoint)
    }

    fn advance(&mut self, checkpoint: u64) {
        if checkpoint > self.checkpoint {
            self.checkpoint = checkpoint;
            self.window = self.window.split_off(&(checkpoint + 1));
        }
    }
}

impl<E: EventStore, S: LogRelayStore> LogOutbox<E, S> {
    /// The log of `events` as an outbox for the relay `config.name`.
    pub fn new(events: E, state: S, config: LogRelayConfig) -> Result<Self> {
        config.validate()?;
        Ok(LogOutbox {
            events,
            state,
            filter: Arc::new(config.filter()),
            config: Arc::new(config),
            view: Arc::new(Mutex::new(View::default())),
        })
    }

    /// The relay's configuration.
    pub fn config(&self) -> &LogRelayConfig {
        &self.config
    }

    /// The checkpoint this process last wrote or loaded (0 before the lease).
    pub fn checkpoint(&self) -> u64 {
        self.view().checkpoint
    }

    fn view(&self) -> MutexGuard<'_, View> {
        // a panic elsewhere while holding the lock leaves plain data behind
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn holder(&self, relay: &str) -> Option<LogRelayHolder> {
        self.view().holder.clone().filter(|h| h.holder == relay)
    }

    /// Write `entries` (and heads, checkpoint) under the lease; on success
    /// apply them to the view. `false`: fenced (the view is dropped; the
    /// relay renews and reloads).
    async fn write(
        &self,
        holder: &LogRelayHolder,
        entries: Vec<JournalEntry>,
        heads: Vec<(String, u64)>,
        checkpoint: Option<u64>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let written = self
            .state
            .write(
                holder,
                JournalWrite {
                    entries: &entries,
                    heads: &heads,
                    checkpoint,
                },
                now,
            )
            .await?;
        let mut view = self.view();
        if view.holder.as_ref() != Some(holder) {
            return Ok(written);
        }
        if !written {
            warn!(relay = %self.config.name, holder = %holder.holder,
                "log relay lease lost or its state changed; renewing and reloading");
            view.holder = None;
            return Ok(false);
        }
        for e in entries {
            if e.position > view.checkpoint {
                view.window.insert(e.position, e);
            }
        }
        for (topic, last) in heads {
            view.heads.insert(topic, last);
        }
        if let Some(c) = checkpoint {
            view.advance(c);
            metrics::gauge!(m::LOG_RELAY_CHECKPOINT, "relay" => self.config.name.clone())
                .set(c as f64);
        }
        Ok(true)
    }

    /// The record the relay publishes for `event` as the journal knows it.
    fn record(&self, event: &RecordedEvent, entry: &JournalEntry) -> Result<OutboxRecord> {
        let message = if entry.status == JournalStatus::Dead {
            skip_marker(event, entry)?
        } else {
            event.to_message(&entry.topic)?
        };
        Ok(OutboxRecord {
            position: i64::try_from(event.position).unwrap_or(i64::MAX),
            partition: 0,
            attempts: entry.attempts,
            republish: entry.republish,
            sequence: entry.sequence,
            message,
        })
    }

    /// Settle `position` as the relay decided (`f` changes its entry) and
    /// raise the checkpoint as far as that allows, in one fenced write.
    async fn settle_one(
        &self,
        relay: &str,
        position: i64,
        now: DateTime<Utc>,
        f: impl FnOnce(&mut JournalEntry),
    ) -> Result<RowWrite> {
        let Some(holder) = self.holder(relay) else {
            return Ok(RowWrite::Fenced);
        };
        let position = u64::try_from(position).unwrap_or(0);
        let (entry, checkpoint) = {
            let view = self.view();
            let Some(mut entry) = view.window.get(&position).cloned() else {
                return Ok(RowWrite::NotPending);
            };
            if entry.status != JournalStatus::Pending {
                return Ok(RowWrite::NotPending);
            }
            f(&mut entry);
            let checkpoint = if entry.status.settled() {
                Some(view.reachable_with(&BTreeMap::from([(position, entry.clone())])))
            } else {
                None
            };
            (entry, checkpoint)
        };
        Ok(
            if self
                .write(&holder, vec![entry], Vec::new(), checkpoint, now)
                .await?
            {
                RowWrite::Written
            } else {
                RowWrite::Fenced
            },
        )
    }
}

/// The skip marker published in place of a dead-lettered numbered event:
/// its own id (kept in the journal, so a republish is deduplicated), the
/// event's stream as key, the skipped event's id in [`SKIPPED_HEADER`].
fn skip_marker(event: &RecordedEvent, entry: &JournalEntry) -> Result<Message> {
    let marker_id = entry.marker_id.unwrap_or(event.id);
    Message::builder(&entry.topic, event.stream.clone(), SKIP_TYPE)
        .id(marker_id)
        .kind(MessageKind::Event)
        .json(&serde_json::json!({
            "skipped": event.id.to_string(),
            "reason": entry.error.clone().unwrap_or_default(),
        }))?
        .header(SKIPPED_HEADER, event.id.to_string())?
        .build()
}

impl<E: EventStore, S: LogRelayStore> OutboxStore for LogOutbox<E, S> {
    fn partitions(&self) -> u32 {
        1
    }

    async fn acquire_leases(
        &self,
        relay: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<u32>> {
        let name = &self.config.name;
        let Some(token) = self.state.acquire(name, relay, ttl, now).await? else {
            self.view().holder = None;
            return Ok(Vec::new());
        };
        let holder = LogRelayHolder {
            relay: name.clone(),
            holder: relay.to_owned(),
            token,
        };
        if self.view().holder.as_ref() == Some(&holder) {
            return Ok(vec![0]);
        }
        // A new lease, or the state changed under it (a takeover before,
        // a republish): start again from what the store holds.
        let loaded = self.state.load(name).await?;
        let mut view = self.view();
        *view = View {
            holder: Some(holder),
            checkpoint: loaded.checkpoint,
            scanned_to: loaded.checkpoint,
            producer: loaded.producer,
            heads: loaded.heads.into_iter().collect(),
            window: loaded
                .journal
                .into_iter()
                .filter(|e| e.position > loaded.checkpoint)
                .map(|e| (e.position, e))
                .collect(),
        };
        debug!(relay = %name, holder = %relay, checkpoint = view.checkpoint,
            journal = view.window.len(), "log relay lease taken; state loaded");
        Ok(vec![0])
    }

    async fn release_leases(&self, relay: &str) -> Result<()> {
        self.view().holder = None;
        self.state.release(&self.config.name, relay).await
    }

    async fn fetch_batch(
        &self,
        partitions: &[u32],
        limit: usize,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxRecord>> {
        let Some(holder) = self.view().holder.clone() else {
            return Ok(Vec::new());
        };
        if !partitions.contains(&0) || limit == 0 {
            return Ok(Vec::new());
        }
        let mut cursor = self.view().checkpoint;
        // Streams held back: an event of theirs is parked or was passed
        // over, so none of their later events may overtake it.
        let mut blocked: HashSet<String> = HashSet::new();
        let mut out = Vec::new();
        let mut unsendable: Vec<(u64, String)> = Vec::new();
        for _ in 0..MAX_PAGES {
            let slice = self
                .events
                .read_all(cursor, &self.filter, PAGE.max(limit))
                .await?;
            let mut view = self.view();
            if view.holder.as_ref() != Some(&holder) {
                return Ok(Vec::new());
            }
            let mut stopped_at = None;
            for event in &slice.events {
                if event.position <= view.checkpoint {
                    continue;
                }
                if out.len() >= limit {
                    stopped_at = Some(event.position - 1);
                    break;
                }
                let topic = self.config.topic_of(event.category());
                let entry = view
                    .window
                    .entry(event.position)
                    .or_insert_with(|| {
                        JournalEntry::new(event.position, event.id, &event.stream, topic)
                    })
                    .clone();
                if entry.status.settled() {
                    continue;
                }
                let parked = entry.retry_at.is_some_and(|t| t > now);
                if parked || blocked.contains(&event.stream) {
                    blocked.insert(event.stream.clone());
                    continue;
                }
                match self.record(event, &entry) {
                    Ok(rec) => out.push(rec),
                    Err(e) => {
                        // An event no message can carry (a header the
                        // envelope refuses): dead-lettered below, with its
                        // reason; its stream waits for that (invariant 6).
                        warn!(event_id = %event.id, error = %e, "event cannot become a message; dead-lettering");
                        unsendable.push((event.position, e.to_string()));
                        blocked.insert(event.stream.clone());
                    }
                }
            }
            let covered = stopped_at.unwrap_or(slice.scanned_to);
            view.scanned_to = view.scanned_to.max(covered);
            if stopped_at.is_some()
                || out.len() >= limit
                || slice.scanned_to <= cursor
                || slice.scanned_to >= slice.head
            {
                break;
            }
            cursor = slice.scanned_to;
        }
        for (position, reason) in unsendable {
            let reason = format!("the event cannot be published as a message: {reason}");
            let position = i64::try_from(position).unwrap_or(i64::MAX);
            let done =
                OutboxStore::dead_letter(self, &holder.holder, position, &reason, now).await?;
            if done == RowWrite::Written {
                metrics::counter!(m::RELAY_DEAD_LETTERED_TOTAL).increment(1);
            }
        }
        Ok(out)
    }

    async fn producer_id(&self) -> Result<Option<String>> {
        let producer = self.view().producer.clone();
        if producer.is_empty() {
            // not loaded yet: the store's row has it
            return Ok(Some(self.state.load(&self.config.name).await?.producer));
        }
        Ok(Some(producer))
    }

    async fn assign_sequences(
        &self,
        relay: &str,
        records: &mut Vec<OutboxRecord>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let Some(holder) = self.holder(relay) else {
            records.clear();
            return Ok(());
        };
        let (entries, heads) = {
            let view = self.view();
            let mut heads = view.heads.clone();
            let mut entries = Vec::new();
            for rec in records.iter_mut().filter(|r| r.sequence.is_none()) {
                let position = u64::try_from(rec.position).unwrap_or(0);
                let Some(mut entry) = view.window.get(&position).cloned() else {
                    continue;
                };
                let last = heads.entry(entry.topic.clone()).or_insert(0);
                *last += 1;
                entry.sequence = Some(*last);
                rec.sequence = Some(*last);
                entries.push(entry);
            }
            (entries, heads.into_iter().collect::<Vec<_>>())
        };
        if entries.is_empty() {
            return Ok(());
        }
        if !self.write(&holder, entries, heads, None, now).await? {
            // fenced: not ours to number or publish any more
            records.clear();
        }
        Ok(())
    }

    async fn mark_published(
        &self,
        relay: &str,
        acked: &[(i64, PublishAck)],
        now: DateTime<Utc>,
    ) -> Result<u64> {
        let Some(holder) = self.holder(relay) else {
            return Ok(0);
        };
        let (entries, checkpoint) = {
            let view = self.view();
            let mut changed = BTreeMap::new();
            for (position, ack) in acked {
                let position = u64::try_from(*position).unwrap_or(0);
                let Some(entry) = view.window.get(&position) else {
                    continue;
                };
                let mut entry = entry.clone();
                entry.status = match entry.status {
                    JournalStatus::Dead => JournalStatus::DeadSettled,
                    JournalStatus::Pending => JournalStatus::Published,
                    settled => settled,
                };
                entry.reference = ack.reference();
                entry.published_at = Some(now);
                entry.retry_at = None;
                changed.insert(position, entry);
            }
            let checkpoint = view.reachable_with(&changed);
            (changed.into_values().collect::<Vec<_>>(), checkpoint)
        };
        let n = entries.len() as u64;
        if n == 0 {
            return Ok(0);
        }
        if self
            .write(&holder, entries, Vec::new(), Some(checkpoint), now)
            .await?
        {
            Ok(n)
        } else {
            Ok(0)
        }
    }

    async fn record_failure(
        &self,
        relay: &str,
        position: i64,
        error: &str,
        retry_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<RowWrite> {
        self.settle_one(relay, position, now, |e| {
            e.attempts = e.attempts.saturating_add(1);
            e.retry_at = Some(retry_at);
            e.error = Some(error.to_owned());
        })
        .await
    }

    async fn dead_letter(
        &self,
        relay: &str,
        position: i64,
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<RowWrite> {
        self.settle_one(relay, position, now, |e| {
            e.error = Some(error.to_owned());
            e.retry_at = None;
            if e.sequence.is_some() {
                // the number stays accounted for: a skip marker takes the
                // event's place (published by the next fetch)
                e.status = JournalStatus::Dead;
                e.marker_id = Some(Uuid::now_v7());
            } else {
                e.status = JournalStatus::DeadSettled;
            }
        })
        .await
    }

    async fn prune(
        &self,
        partitions: &[u32],
        older_than: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64> {
        if !partitions.contains(&0) {
            return Ok(0);
        }
        self.state.prune(&self.config.name, older_than, limit).await
    }

    async fn wait_for_new(&self, timeout: Duration) {
        let after = self.view().scanned_to;
        if let Err(e) = self.events.wait_for_head(after, timeout).await {
            debug!(error = %e, "waiting for the event log failed; polling");
            tokio::time::sleep(timeout).await;
        }
    }
}

/// The sent side of `custody reconcile` for a log relay
/// ([`custody_core::SentHistory`]): what the event log holds for a topic
/// (sent or still to be sent) and what the relay's journal says
/// (dead letters, numbers), so a consumer's inbox can be compared with the
/// event store instead of an outbox.
///
/// The log has no index by event id, so the first question about a topic
/// reads the relay's part of the log once, up to the head at that moment,
/// and keeps the topic's ids sorted in memory (16 bytes per event); the
/// ranges reconcile asks for afterwards are answered from that.
pub struct EventLogHistory<E, S> {
    events: E,
    state: S,
    config: LogRelayConfig,
    ids: tokio::sync::Mutex<BTreeMap<String, Vec<Uuid>>>,
}

impl<E: EventStore, S: LogRelayStore> EventLogHistory<E, S> {
    /// The history of the log relay `config.name` over `events`.
    pub fn new(events: E, state: S, config: LogRelayConfig) -> Result<Self> {
        config.validate()?;
        Ok(EventLogHistory {
            events,
            state,
            config,
            ids: tokio::sync::Mutex::new(BTreeMap::new()),
        })
    }

    /// The ids of `topic`'s events, sorted (read once, see the type's docs).
    async fn topic_ids(&self, topic: &str) -> Result<Vec<Uuid>> {
        let mut cache = self.ids.lock().await;
        if let Some(ids) = cache.get(topic) {
            return Ok(ids.clone());
        }
        let filter = self.config.filter();
        let head = self.events.head().await?;
        let mut after = 0;
        let mut ids = Vec::new();
        while after < head {
            let slice = self.events.read_all(after, &filter, 4096).await?;
            for e in &slice.events {
                if e.position <= head && self.config.topic_of(e.category()) == topic {
                    ids.push(e.id);
                }
            }
            if slice.scanned_to <= after {
                break;
            }
            after = slice.scanned_to;
        }
        ids.sort_unstable();
        cache.insert(topic.to_owned(), ids.clone());
        Ok(ids)
    }
}

impl<E: EventStore, S: LogRelayStore> custody_core::SentHistory for EventLogHistory<E, S> {
    async fn sent_ids(&self, topic: &str, range: custody_core::IdRange) -> Result<Vec<Uuid>> {
        let ids = self.topic_ids(topic).await?;
        let dead: HashSet<Uuid> = self
            .state
            .entries_in(&self.config.name, topic, range.from, range.to)
            .await?
            .into_iter()
            .filter(|e| e.status.dead())
            .map(|e| e.event_id)
            .collect();
        Ok(ids
            .into_iter()
            .filter(|id| *id >= range.from && *id < range.to && !dead.contains(id))
            .collect())
    }

    async fn sent_dead(
        &self,
        topic: &str,
        range: custody_core::IdRange,
    ) -> Result<Vec<(Uuid, String)>> {
        Ok(self
            .state
            .entries_in(&self.config.name, topic, range.from, range.to)
            .await?
            .into_iter()
            .filter(|e| e.status.dead())
            .map(|e| (e.event_id, e.error.unwrap_or_default()))
            .collect())
    }

    async fn republish(&self, ids: &[Uuid]) -> Result<u64> {
        self.state.republish(&self.config.name, ids).await
    }

    async fn sequence_heads(&self) -> Result<Option<(String, Vec<custody_core::SequenceHead>)>> {
        let state = self.state.load(&self.config.name).await?;
        Ok(Some((
            state.producer,
            state
                .heads
                .into_iter()
                .map(|(topic, last)| custody_core::SequenceHead {
                    topic,
                    partition: 0,
                    last,
                })
                .collect(),
        )))
    }

    async fn numbered(
        &self,
        topic: &str,
        partition: u32,
        seqs: &[u64],
    ) -> Result<Vec<custody_core::NumberedRow>> {
        if partition != 0 || seqs.is_empty() {
            return Ok(Vec::new());
        }
        let wanted: HashSet<u64> = seqs.iter().copied().collect();
        let all = self
            .state
            .entries_in(&self.config.name, topic, Uuid::nil(), Uuid::max())
            .await?;
        Ok(all
            .into_iter()
            .filter_map(|e| {
                let seq = e.sequence.filter(|s| wanted.contains(s))?;
                Some(custody_core::NumberedRow {
                    seq,
                    id: e.event_id,
                    status: e.status.word().to_owned(),
                    published_at: e.published_at,
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(position: u64, status: JournalStatus) -> JournalEntry {
        let mut e = JournalEntry::new(position, Uuid::now_v7(), "s-1", "t");
        e.status = status;
        e
    }

    fn view(checkpoint: u64, scanned_to: u64, entries: &[(u64, JournalStatus)]) -> View {
        View {
            checkpoint,
            scanned_to,
            window: entries.iter().map(|(p, s)| (*p, entry(*p, *s))).collect(),
            ..View::default()
        }
    }

    #[test]
    fn the_checkpoint_stops_below_the_first_unsettled_event() {
        use JournalStatus::*;
        let v = view(
            3,
            20,
            &[(5, Published), (8, Pending), (9, Published), (12, Dead)],
        );
        assert_eq!(v.reachable_with(&BTreeMap::new()), 7);
        let acked = BTreeMap::from([(8, entry(8, Published))]);
        assert_eq!(
            v.reachable_with(&acked),
            11,
            "the dead one's marker is not acked yet"
        );
        let all = BTreeMap::from([(8, entry(8, Published)), (12, entry(12, DeadSettled))]);
        assert_eq!(v.reachable_with(&all), 20, "everything scanned is settled");
        // never below the stored checkpoint
        assert_eq!(view(10, 10, &[]).reachable_with(&BTreeMap::new()), 10);
    }

    #[test]
    fn topics_per_category_then_default_then_the_category() {
        let c = LogRelayConfig::new("r").topic_for("order", "orders");
        assert_eq!(c.topic_of("order"), "orders");
        assert_eq!(c.topic_of("invoice"), "invoice");
        assert_eq!(c.clone().default_topic("all").topic_of("invoice"), "all");
        assert!(LogRelayConfig::new("").validate().is_err());
    }

    proptest! {
        /// Whatever is settled, the checkpoint never passes an unsettled
        /// event, never goes back, and reaches the scan when all are settled.
        #[test]
        fn reachable_never_passes_an_unsettled_event(
            checkpoint in 0u64..50,
            gaps in proptest::collection::vec((1u64..4, 0i64..4), 0..40),
            tail in 0u64..10,
        ) {
            let mut p = checkpoint;
            let mut entries = Vec::new();
            for (gap, code) in gaps {
                p += gap;
                entries.push((p, JournalStatus::from_code(code)));
            }
            let scanned_to = p + tail;
            let v = view(checkpoint, scanned_to, &entries);
            let r = v.reachable_with(&BTreeMap::new());
            prop_assert!(r >= checkpoint);
            prop_assert!(r <= scanned_to);
            for (pos, status) in &entries {
                if !status.settled() {
                    prop_assert!(r < *pos);
                }
            }
            if entries.iter().all(|(_, s)| s.settled()) {
                prop_assert_eq!(r, scanned_to);
            }
        }
    }
}
