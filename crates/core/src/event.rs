//! The event store: the contract every backend implements ([`EventStore`]),
//! the shapes of what goes in ([`EventData`]) and comes out
//! ([`RecordedEvent`]), and the typed outcomes of an append.
//!
//! The model (docs/EVENTSTORE.md):
//!
//! - A **stream** (`order-42`) is an ordered list of events. Its **version**
//!   is the number of events ever appended to it: the first event has version
//!   1, a stream that does not exist has version 0. Its **category** is the
//!   part of its name before the first `-` (`order`).
//! - Every event also has a **position** in the global log, greater than 0,
//!   increasing in commit order. A reader of the global log
//!   ([`EventStore::read_all`]) never skips an event whose transaction
//!   commits after an event with a higher position was read
//!   (docs/ARCHITECTURE.md invariant 5): a store hands out positions only up
//!   to its **gap-free head** ([`EventStore::head`]).
//! - An append is atomic per call, checked against an [`ExpectedVersion`];
//!   a conflict is an outcome ([`AppendOutcome::WrongVersion`]) carrying
//!   the actual version, not an error. Appending events whose ids are already
//!   in the stream, at the same versions, is idempotent: the outcome is the
//!   original one ([`Appended::idempotent`]) and nothing is written twice.
//! - An append may instead be conditioned on a [`Query`] (event types and
//!   tags) having no new match since a position
//!   ([`EventStore::append_if`]): the dynamic consistency boundary, which
//!   enforces an invariant spanning several entities without a saga.
//!
//! ```
//! use custody_core::event::{EventData, ExpectedVersion};
//!
//! #[derive(serde::Serialize)]
//! struct Deposited { cents: i64 }
//!
//! let event = EventData::json("Deposited", &Deposited { cents: 500 })?
//!     .schema_version(2)
//!     .tag("account:7")
//!     .header(custody_core::headers::CORRELATION_ID, "req-42")?;
//! assert_eq!(event.event_type, "Deposited");
//! assert_eq!(event.id.get_version_num(), 7);
//! assert!(ExpectedVersion::Exact(0).matches(None));
//! assert!(!ExpectedVersion::NoStream.matches(Some(3)));
//! # Ok::<(), custody_core::Error>(())
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::admin::BoxFuture;
use crate::message::{validate_header_name, MAX_NAME_LEN};
use crate::{Error, Message, MessageKind, Result, CONTENT_TYPE_JSON};

/// An event to append: what the caller decides, before the store gives it a
/// stream version and a position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventData {
    /// UUIDv7 chosen by the caller: the idempotency key of the append, and
    /// the message id when the event is published.
    pub id: Uuid,
    /// Event type, e.g. `OrderPlaced`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Schema version of the payload (1 for the first); upcasters
    /// ([`crate::upcast`]) bring older versions up on read.
    pub schema_version: u32,
    /// Media type of `payload`.
    pub content_type: String,
    /// Payload bytes.
    #[serde(with = "crate::message::payload_bytes")]
    pub payload: Vec<u8>,
    /// Metadata: correlation id, causation id, traceparent, ... (the names
    /// of [`crate::headers`]).
    pub headers: BTreeMap<String, String>,
    /// Tags for [`Query`] (e.g. `course:42`, `student:7`).
    pub tags: Vec<String>,
}

impl EventData {
    /// An event of `event_type` with raw `payload`, a fresh UUIDv7 id and
    /// schema version 1.
    pub fn new(
        event_type: impl Into<String>,
        content_type: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        EventData {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version: 1,
            content_type: content_type.into(),
            payload: payload.into(),
            headers: BTreeMap::new(),
            tags: Vec::new(),
        }
    }

    /// An event of `event_type` whose payload is `value` as JSON.
    pub fn json<T: Serialize>(event_type: impl Into<String>, value: &T) -> Result<Self> {
        let payload = serde_json::to_vec(value).map_err(|e| {
            Error::InvalidMessage(format!("cannot encode event payload as JSON: {e}"))
        })?;
        Ok(Self::new(event_type, CONTENT_TYPE_JSON, payload))
    }

    /// Use `id` instead of a fresh one (a retried command must reuse its ids
    /// so the append is idempotent).
    pub fn id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Set the payload's schema version.
    pub fn schema_version(mut self, version: u32) -> Self {
        self.schema_version = version;
        self
    }

    /// Add a metadata header; the name follows the header rules of
    /// [`Message`].
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Result<Self> {
        validate_header_name(name)?;
        self.headers.insert(name.to_owned(), value.into());
        Ok(self)
    }

    /// Add a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Check what every store requires: a type of 1..=255 bytes without
    /// control characters, a content type of at most 255 bytes without
    /// control characters, schema version ≥ 1, valid header names and
    /// header values without NUL, tags of 1..=255 bytes without NUL. The
    /// error names the event and what to change.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| {
            Err(Error::InvalidMessage(format!(
                "event {} ({:?}): {what}",
                self.id, self.event_type
            )))
        };
        if self.event_type.is_empty() || self.event_type.len() > MAX_NAME_LEN {
            return bad(format!("the type must be 1 to {MAX_NAME_LEN} bytes"));
        }
        // As for a message's type and content type (Message::validate): an
        // event becomes a message when it is published, so what a message
        // refuses is refused here, before it is stored and cannot be sent.
        if let Some(c) = self.event_type.chars().find(|c| c.is_control()) {
            return bad(format!(
                "the type holds the control character {c:?}; use printable characters only"
            ));
        }
        if let Some(c) = self.content_type.chars().find(|c| c.is_control()) {
            return bad(format!(
                "the content type {} holds the control character {c:?}; use a media type such as \"application/json\"",
                crate::message::escape_text(&self.content_type)
            ));
        }
        if self.content_type.len() > MAX_NAME_LEN {
            return bad(format!(
                "the content type must be at most {MAX_NAME_LEN} bytes"
            ));
        }
        if self.schema_version == 0 {
            return bad("schema versions start at 1".into());
        }
        for (name, value) in &self.headers {
            validate_header_name(name)?;
            if value.contains('\0') {
                return bad(format!(
                    "header {name:?} holds a NUL byte, which no store can keep; remove it"
                ));
            }
        }
        for tag in &self.tags {
            if tag.is_empty() || tag.len() > MAX_NAME_LEN || tag.contains('\0') {
                return bad(format!(
                    "tag {tag:?} must be 1 to {MAX_NAME_LEN} bytes without NUL"
                ));
            }
        }
        Ok(())
    }
}

/// Check a stream name: 1..=255 bytes, no NUL. The error says what to change.
pub fn validate_stream_name(stream: &str) -> Result<()> {
    if stream.is_empty() || stream.len() > MAX_NAME_LEN || stream.contains('\0') {
        return Err(Error::InvalidMessage(format!(
            "stream name {stream:?} must be 1 to {MAX_NAME_LEN} bytes without NUL (e.g. \"order-42\")"
        )));
    }
    Ok(())
}

/// The category of a stream: its name up to the first `-` (`order-42` →
/// `order`); a name without `-` is its own category.
pub fn category_of(stream: &str) -> &str {
    stream.split_once('-').map_or(stream, |(c, _)| c)
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// The stream it belongs to.
    pub stream: String,
    /// Its version in the stream (1 for the first event).
    pub version: u64,
    /// Its position in the global log (> 0, increasing in commit order).
    pub position: u64,
    /// The id the appender chose.
    pub id: Uuid,
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Schema version of `payload` (after upcasting, the upcast version).
    pub schema_version: u32,
    /// Media type of `payload`.
    pub content_type: String,
    /// Payload bytes.
    #[serde(with = "crate::message::payload_bytes")]
    pub payload: Vec<u8>,
    /// Metadata headers.
    pub headers: BTreeMap<String, String>,
    /// Tags.
    pub tags: Vec<String>,
    /// When the store recorded it (the append's transaction time).
    pub recorded_at: DateTime<Utc>,
}

impl RecordedEvent {
    /// Decode a JSON payload; the error names the event, its stream and type.
    pub fn decode_json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| Error::Decode {
            message_id: self.id,
            message_type: self.event_type.clone(),
            reason: format!(
                "event {} of stream {} (schema version {}): {e}",
                self.version, self.stream, self.schema_version
            ),
        })
    }

    /// The category of its stream ([`category_of`]).
    pub fn category(&self) -> &str {
        category_of(&self.stream)
    }

    /// The event as a custody [`Message`] on `topic`: same id (consumers
    /// dedupe by it), key = the stream (per-stream order is per-key order),
    /// type, payload and headers, plus the `stream`, `version`, `position`
    /// and `schemaversion` headers.
    pub fn to_message(&self, topic: &str) -> Result<Message> {
        let mut builder = Message::builder(topic, self.stream.clone(), self.event_type.clone())
            .id(self.id)
            .kind(MessageKind::Event)
            .payload(self.content_type.clone(), self.payload.clone())
            .created_at(self.recorded_at);
        for (name, value) in &self.headers {
            builder = builder.header(name, value.clone())?;
        }
        builder
            .header(event_headers::STREAM, self.stream.clone())?
            .header(event_headers::VERSION, self.version.to_string())?
            .header(event_headers::POSITION, self.position.to_string())?
            .header(
                event_headers::SCHEMA_VERSION,
                self.schema_version.to_string(),
            )?
            .build()
    }
}

/// Headers an event published as a message carries ([`RecordedEvent::to_message`]).
pub mod event_headers {
    /// The event's stream.
    pub const STREAM: &str = "stream";
    /// The event's version in its stream.
    pub const VERSION: &str = "streamversion";
    /// The event's position in the global log.
    pub const POSITION: &str = "logposition";
    /// The payload's schema version.
    pub const SCHEMA_VERSION: &str = "schemaversion";
}

/// What the appender expects the stream's version to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// Whatever it is (no check; a tombstoned stream still refuses).
    Any,
    /// The stream must not exist (version 0).
    NoStream,
    /// The stream must exist (version ≥ 1).
    StreamExists,
    /// The stream's version must be exactly this (0 = no stream).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream at `actual` (`None`: no stream) satisfies this.
    pub fn matches(self, actual: Option<u64>) -> bool {
        let v = actual.unwrap_or(0);
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => v == 0,
            ExpectedVersion::StreamExists => v > 0,
            ExpectedVersion::Exact(n) => v == n,
        }
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::StreamExists => f.write_str("an existing stream"),
            ExpectedVersion::Exact(n) => write!(f, "version {n}"),
        }
    }
}

/// A successful append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    /// Version of the first appended event (for an empty append: the
    /// stream's version + 1).
    pub first_version: u64,
    /// The stream's version after the append (= version of the last event).
    pub version: u64,
    /// True when every event was already in the stream at these versions
    /// (a retried append): nothing was written.
    pub idempotent: bool,
}

/// The outcome of an append: written, or refused for a reason the caller
/// acts on (re-read and decide again, or give up). Store failures are
/// errors, not outcomes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AppendOutcome {
    /// Appended (or already there: [`Appended::idempotent`]).
    Appended(Appended),
    /// The stream's version was not what the appender expected.
    WrongVersion {
        /// What the appender expected.
        expected: ExpectedVersion,
        /// The stream's version (`None`: no stream).
        actual: Option<u64>,
    },
    /// The stream was deleted with [`DeleteMode::Tombstone`]: it takes no
    /// more events, ever.
    Tombstoned,
    /// [`EventStore::append_if`]: an event matching the condition's query
    /// was appended after the condition's position.
    ConditionFailed {
        /// Position of the first such event (0 when it is committed but has
        /// no position yet).
        position: u64,
    },
}

impl AppendOutcome {
    /// The successful append, if it was one.
    pub fn appended(&self) -> Option<Appended> {
        match self {
            AppendOutcome::Appended(a) => Some(*a),
            _ => None,
        }
    }
}

/// Which way a stream is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// From `from` up (inclusive), oldest first.
    Forward,
    /// From `from` down (inclusive), newest first; `u64::MAX` = from the end.
    Backward,
}

/// A slice of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRead {
    /// The events, honouring the stream's metadata (truncate-before,
    /// max-age, soft delete).
    pub events: Vec<RecordedEvent>,
    /// The stream's version (`None`: no stream). A soft-deleted stream keeps
    /// its version; its events before the deletion are not read.
    pub version: Option<u64>,
    /// The stream was deleted with [`DeleteMode::Tombstone`].
    pub tombstoned: bool,
}

/// What a global-log reader wants. Empty lists mean "all"; categories and
/// types combine with AND, the entries of one list with OR.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogFilter {
    /// Stream categories (`order` for `order-*`).
    pub categories: Vec<String>,
    /// Event types.
    pub types: Vec<String>,
}

impl LogFilter {
    /// Everything.
    pub fn all() -> Self {
        Self::default()
    }

    /// Whether `event` passes.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        (self.categories.is_empty() || self.categories.iter().any(|c| c == event.category()))
            && (self.types.is_empty() || self.types.contains(&event.event_type))
    }
}

/// A slice of the global log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSlice {
    /// The matching events, in position order.
    pub events: Vec<RecordedEvent>,
    /// The position the read covered up to (inclusive): a reader's next
    /// `after`. With a filter it passes non-matching events, so it can be
    /// above the last event's position; never above [`LogSlice::head`].
    pub scanned_to: u64,
    /// The gap-free head when the read was made.
    pub head: u64,
}

/// Query of the dynamic consistency boundary: an event matches if it matches
/// any item.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    /// The alternatives.
    pub items: Vec<QueryItem>,
}

/// One alternative of a [`Query`]: the event's type is one of `types` (any,
/// if empty) and it carries every tag of `tags`. An item with neither
/// matches every event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryItem {
    /// Event types, any of.
    pub types: Vec<String>,
    /// Tags, all of.
    pub tags: Vec<String>,
}

impl Query {
    /// Whether `event` matches (see [`QueryItem`]).
    pub fn matches(&self, event_type: &str, tags: &[String]) -> bool {
        self.items.iter().any(|item| {
            (item.types.is_empty() || item.types.iter().any(|t| t == event_type))
                && item.tags.iter().all(|t| tags.contains(t))
        })
    }
}

/// The condition of [`EventStore::append_if`]: no event matching `query`
/// was appended after position `after` (the position the decision was read
/// at; 0 = none must exist at all).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendCondition {
    /// What must not have changed.
    pub query: Query,
    /// The position the caller's decision read up to.
    pub after: u64,
}

/// Per-stream settings that reads honour.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMetadata {
    /// Events with a lower version are not read (soft delete sets it to the
    /// version + 1).
    pub truncate_before: Option<u64>,
    /// Events older than this are not read.
    #[serde(with = "crate::policy::duration_serde::option", default)]
    pub max_age: Option<Duration>,
    /// Free-form application metadata (JSON object), kept as given.
    pub custom: Option<serde_json::Value>,
}

/// How a stream is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeleteMode {
    /// Its events are no longer read ([`StreamMetadata::truncate_before`]);
    /// appending again continues at the next version.
    Soft,
    /// As `Soft`, and the stream refuses every later append
    /// ([`AppendOutcome::Tombstoned`]).
    Tombstone,
}

/// What the store knows about a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// The name.
    pub stream: String,
    /// The version (number of events ever appended).
    pub version: u64,
    /// Its metadata.
    pub metadata: StreamMetadata,
    /// Deleted with [`DeleteMode::Tombstone`].
    pub tombstoned: bool,
    /// When its last event was appended (or metadata changed).
    pub updated_at: DateTime<Utc>,
}

/// A saved aggregate state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The stream the state was folded from.
    pub stream: String,
    /// The aggregate type (one stream may have snapshots of several).
    pub aggregate: String,
    /// Version of the state's encoding; a repository ignores a snapshot
    /// whose schema version is not its own (never misreads it).
    pub schema_version: u32,
    /// The stream version the state includes.
    pub version: u64,
    /// The encoded state.
    #[serde(with = "crate::message::payload_bytes")]
    pub state: Vec<u8>,
    /// When it was saved.
    pub taken_at: DateTime<Utc>,
}

/// Counts of an event store's write path since the store was made (the
/// `write_stats()` of `SqliteEventStore` and `PgEventStore`): how well
/// concurrent appends are combined into shared transactions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Transactions the store ran for `append` / `append_if`.
    pub transactions: u64,
    /// Appends (`append` / `append_if` calls) those transactions decided
    /// (written or refused).
    pub writes: u64,
    /// The most appends one transaction decided.
    pub largest_batch: u64,
    /// Appends waiting in the combining queue right now.
    pub queued: u64,
    /// Appends in a transaction running right now.
    pub running: u64,
}

/// An event store. Implementations: `custody_sqlite::SqliteEventStore`,
/// `custody_postgres::PgEventStore`; every one runs
/// `custody_testkit::eventstore_conformance!`.
///
/// Appends that must commit with the caller's business rows (and outbox
/// messages) go through the backend's own `append_in(&mut conn, …)`, which
/// joins the caller's transaction; the methods here own their transaction.
pub trait EventStore: Clone + Send + Sync + 'static {
    /// Append `events` to `stream` atomically if its version matches
    /// `expected`. Events whose ids are already in the stream at the versions
    /// this append would give them make it idempotent
    /// ([`Appended::idempotent`]); an id that is in the stream at another
    /// place is [`AppendOutcome::WrongVersion`]. Validates names and events
    /// ([`EventData::validate`]) first.
    fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> impl Future<Output = Result<AppendOutcome>> + Send;

    /// Append `events` to `stream` (any version) if no event matching
    /// `condition.query` has a position above `condition.after` and none is
    /// committed without a position yet, nor being appended concurrently:
    /// two appends whose conditions both pass cannot both commit if each
    /// would make the other's query match.
    fn append_if(
        &self,
        stream: &str,
        condition: &AppendCondition,
        events: Vec<EventData>,
    ) -> impl Future<Output = Result<AppendOutcome>> + Send;

    /// Read up to `limit` events of `stream` from version `from` (inclusive)
    /// in `direction`, honouring its metadata.
    fn read_stream(
        &self,
        stream: &str,
        direction: Direction,
        from: u64,
        limit: usize,
    ) -> impl Future<Output = Result<StreamRead>> + Send;

    /// Read up to `limit` events of the global log with a position above
    /// `after` that pass `filter`, in position order, never past the
    /// gap-free head (invariant 5). Stream metadata does not hide events
    /// here: log readers (projections, relays) see every event.
    fn read_all(
        &self,
        after: u64,
        filter: &LogFilter,
        limit: usize,
    ) -> impl Future<Output = Result<LogSlice>> + Send;

    /// Events matching `query` with a position above `after`, in position
    /// order, up to `limit` (to build a decision for
    /// [`EventStore::append_if`]).
    fn read_query(
        &self,
        query: &Query,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<LogSlice>> + Send;

    /// The gap-free head: every event with a position at or below it is
    /// committed and readable, and no event committed later gets one.
    fn head(&self) -> impl Future<Output = Result<u64>> + Send;

    /// Wait until the head is above `after` or `timeout` passes; returns the
    /// head. Woken by appends (in-process, or the database's notifications),
    /// with polling as the fallback.
    fn wait_for_head(
        &self,
        after: u64,
        timeout: Duration,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// The stream's version, metadata and state (`None`: no stream).
    fn stream_info(&self, stream: &str) -> impl Future<Output = Result<Option<StreamInfo>>> + Send;

    /// Replace the stream's metadata (creating the stream's record at
    /// version 0 if it has none).
    fn set_metadata(
        &self,
        stream: &str,
        metadata: &StreamMetadata,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Delete the stream if its version matches `expected` (see [`DeleteMode`]).
    fn delete_stream(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        mode: DeleteMode,
    ) -> impl Future<Output = Result<AppendOutcome>> + Send;

    /// Streams whose name starts with `prefix`, in name order, after `after`,
    /// up to `limit`.
    fn streams(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StreamInfo>>> + Send;

    /// Save `snapshot`, replacing the one of its stream and aggregate.
    fn save_snapshot(&self, snapshot: &Snapshot) -> impl Future<Output = Result<()>> + Send;

    /// The latest snapshot of `stream` for `aggregate`.
    fn load_snapshot(
        &self,
        stream: &str,
        aggregate: &str,
    ) -> impl Future<Output = Result<Option<Snapshot>>> + Send;
}

/// [`EventStore`] in a form usable as `dyn` (the CLI and the server hold
/// `Box<dyn DynEventStore>` whatever the backend); every `EventStore` is one.
pub trait DynEventStore: Send + Sync {
    /// [`EventStore::append`].
    fn append<'a>(
        &'a self,
        stream: &'a str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> BoxFuture<'a, Result<AppendOutcome>>;
    /// [`EventStore::read_stream`].
    fn read_stream<'a>(
        &'a self,
        stream: &'a str,
        direction: Direction,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<StreamRead>>;
    /// [`EventStore::read_all`].
    fn read_all<'a>(
        &'a self,
        after: u64,
        filter: &'a LogFilter,
        limit: usize,
    ) -> BoxFuture<'a, Result<LogSlice>>;
    /// [`EventStore::head`].
    fn head(&self) -> BoxFuture<'_, Result<u64>>;
    /// [`EventStore::wait_for_head`].
    fn wait_for_head(&self, after: u64, timeout: Duration) -> BoxFuture<'_, Result<u64>>;
    /// [`EventStore::stream_info`].
    fn stream_info<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<Option<StreamInfo>>>;
    /// [`EventStore::streams`].
    fn streams<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StreamInfo>>>;
}

impl<T: EventStore> DynEventStore for T {
    fn append<'a>(
        &'a self,
        stream: &'a str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> BoxFuture<'a, Result<AppendOutcome>> {
        Box::pin(EventStore::append(self, stream, expected, events))
    }
    fn read_stream<'a>(
        &'a self,
        stream: &'a str,
        direction: Direction,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<StreamRead>> {
        Box::pin(EventStore::read_stream(
            self, stream, direction, from, limit,
        ))
    }
    fn read_all<'a>(
        &'a self,
        after: u64,
        filter: &'a LogFilter,
        limit: usize,
    ) -> BoxFuture<'a, Result<LogSlice>> {
        Box::pin(EventStore::read_all(self, after, filter, limit))
    }
    fn head(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(EventStore::head(self))
    }
    fn wait_for_head(&self, after: u64, timeout: Duration) -> BoxFuture<'_, Result<u64>> {
        Box::pin(EventStore::wait_for_head(self, after, timeout))
    }
    fn stream_info<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<Option<StreamInfo>>> {
        Box::pin(EventStore::stream_info(self, stream))
    }
    fn streams<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StreamInfo>>> {
        Box::pin(EventStore::streams(self, prefix, after, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_version_matches() {
        assert!(ExpectedVersion::Any.matches(None));
        assert!(ExpectedVersion::NoStream.matches(Some(0)));
        assert!(!ExpectedVersion::StreamExists.matches(None));
        assert!(ExpectedVersion::StreamExists.matches(Some(1)));
        assert!(ExpectedVersion::Exact(3).matches(Some(3)));
        assert!(!ExpectedVersion::Exact(3).matches(Some(4)));
    }

    #[test]
    fn categories_and_filters() {
        assert_eq!(category_of("order-42-x"), "order");
        assert_eq!(category_of("ledger"), "ledger");
        let q = Query {
            items: vec![
                QueryItem {
                    types: vec!["Enrolled".into()],
                    tags: vec!["course:1".into()],
                },
                QueryItem {
                    types: vec![],
                    tags: vec!["student:7".into(), "term:1".into()],
                },
            ],
        };
        assert!(q.matches("Enrolled", &["course:1".into(), "student:9".into()]));
        assert!(!q.matches("Enrolled", &["course:2".into()]));
        assert!(q.matches("Anything", &["term:1".into(), "student:7".into()]));
        assert!(!q.matches("Anything", &["student:7".into()]));
    }

    #[test]
    fn invalid_events_are_named() {
        let e = EventData::new("", CONTENT_TYPE_JSON, b"{}".to_vec());
        let err = e.validate().unwrap_err().to_string();
        assert!(err.contains("type must be"), "{err}");
        let e = EventData::new("T", CONTENT_TYPE_JSON, b"{}".to_vec()).schema_version(0);
        assert!(e
            .validate()
            .unwrap_err()
            .to_string()
            .contains("schema versions start at 1"));
        let e = EventData::new("Bad\ntype", CONTENT_TYPE_JSON, b"{}".to_vec());
        assert!(e
            .validate()
            .unwrap_err()
            .to_string()
            .contains("control character"));
        let e = EventData::new("T", "application/json\0", b"{}".to_vec());
        assert!(e
            .validate()
            .unwrap_err()
            .to_string()
            .contains("content type"));
        let mut e = EventData::new("T", CONTENT_TYPE_JSON, b"{}".to_vec());
        e.headers.insert("correlationid".into(), "a\0b".into());
        assert!(e.validate().unwrap_err().to_string().contains("NUL"));
        assert!(validate_stream_name("").is_err());
        assert!(validate_stream_name("order-1").is_ok());
    }

    #[test]
    fn recorded_event_becomes_a_message_keyed_by_stream() {
        let e = RecordedEvent {
            stream: "order-1".into(),
            version: 3,
            position: 17,
            id: Uuid::now_v7(),
            event_type: "OrderPlaced".into(),
            schema_version: 2,
            content_type: CONTENT_TYPE_JSON.into(),
            payload: b"{}".to_vec(),
            headers: BTreeMap::from([("correlationid".to_owned(), "c1".to_owned())]),
            tags: vec![],
            recorded_at: Utc::now(),
        };
        let m = e.to_message("orders").unwrap();
        assert_eq!(m.id, e.id);
        assert_eq!(m.key, "order-1");
        assert_eq!(m.header(event_headers::POSITION), Some("17"));
        assert_eq!(m.header(event_headers::VERSION), Some("3"));
        assert_eq!(m.header("correlationid"), Some("c1"));
    }
}
