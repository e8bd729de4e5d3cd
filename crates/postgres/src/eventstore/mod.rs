//! The event store on PostgreSQL ([`PgEventStore`]); how it keeps readers
//! of the global log from skipping commits without serializing writers is
//! in the sequencer module and docs/EVENTSTORE.md, "PostgreSQL: how gaps are prevented".

mod append;
mod dcb;
mod sequencer;

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use custody_core::event::{
    category_of, validate_stream_name, AppendCondition, AppendOutcome, Appended, DeleteMode,
    Direction, EventData, EventStore, ExpectedVersion, LogFilter, LogSlice, Query, RecordedEvent,
    Snapshot, StreamInfo, StreamMetadata, StreamRead,
};
use custody_core::{Error, Result};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::{mpsc, oneshot};

use crate::error::{db, map_err};
use crate::wake::{Waiter, Wake};
use append::{Counters, Item, ItemResult, Locking, Probe, Request};

/// How often [`EventStore::wait_for_head`] looks without a notification
/// (a lost NOTIFY, a listener reconnecting) unless
/// [`PgEventStore::with_poll_interval`] says otherwise.
pub const DEFAULT_EVENT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The PostgreSQL event store ([`custody_core::event::EventStore`]).
///
/// Global-log positions are given after commit, in commit order, by a
/// sequencing step that readers run (no background process, no single
/// writer, no timeout, no cluster-wide snapshot xmin): a reader of
/// [`EventStore::read_all`] never skips a commit. Concurrent
/// [`EventStore::append`] calls on one store (and its clones) are combined
/// into one transaction ([`PgEventStore::with_write_combining`]);
/// [`PgEventStore::append_in`] joins the caller's transaction.
///
/// ```no_run
/// use custody_core::event::{EventData, EventStore, ExpectedVersion, LogFilter};
/// use custody_postgres::{connect, migrate, PgEventStore};
///
/// # async fn run() -> custody_core::Result<()> {
/// let pool = connect("postgres://postgres@127.0.0.1:5432/shop").await?;
/// migrate(&pool).await?;
/// let store = PgEventStore::new(pool);
/// let placed = EventData::json("OrderPlaced", &serde_json::json!({"total": 990}))?;
/// store.append("order-1", ExpectedVersion::NoStream, vec![placed]).await?;
/// let slice = store.read_all(0, &LogFilter::all(), 100).await?;
/// assert_eq!(slice.events[0].position, slice.head);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgEventStore {
    pool: PgPool,
    combining: bool,
    poll_interval: Duration,
    shared: Arc<Shared>,
}

/// What clones share: the combiner's queue (its task ends when the last
/// clone drops this), the counters, the LISTEN connection.
struct Shared {
    combiner: OnceLock<mpsc::Sender<Request>>,
    counters: Arc<Counters>,
    wake: Arc<Wake>,
}

impl std::fmt::Debug for PgEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEventStore")
            .field("write_combining", &self.combining)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

pub use custody_core::event::WriteStats;

const OP_READ: &str = "read events";

/// The events of a page of the global log, joined to the commit rows `c`
/// (positions above `$1`, commits numbered at or below `$2`), as a
/// per-commit lookup: each commit's events come from the primary key
/// (tx, ordinal) in ordinal order, and the commits from their
/// `last_position` index in log order, so the LIMIT stops the read after a
/// page. `OFFSET 0` keeps the planner from flattening the lateral
/// subquery into a join it may hash: on tables never analysed (autovacuum
/// off) it read every event and sorted them for each page, 25 × slower. The
/// caller appends its filter (on `e`) and [`PAGE_END`].
const PAGE_EVENTS: &str = "CROSS JOIN LATERAL (SELECT * FROM custody_events e \
     WHERE e.tx = c.tx AND e.ordinal > $1 - c.first_position";

/// Closes [`PAGE_EVENTS`]; the limit is `$5`.
const PAGE_END: &str = "ORDER BY e.ordinal OFFSET 0) e \
     WHERE c.last_position > $1 AND c.first_position <= $2 \
     ORDER BY c.last_position, e.ordinal LIMIT $5";

/// [`PAGE_END`] with the limit in `$3`.
const PAGE_END_3: &str = "ORDER BY e.ordinal OFFSET 0) e \
     WHERE c.last_position > $1 AND c.first_position <= $2 \
     ORDER BY c.last_position, e.ordinal LIMIT $3";

/// The columns of an event, after its position.
const EVENT_COLUMNS: &str = "e.stream, e.version, e.id, e.event_type, e.schema_version, \
     e.content_type, e.payload, e.headers, e.tags, e.recorded_at";

impl PgEventStore {
    /// An event store on `pool` (migrated with [`crate::migrate`]), with
    /// write combining on.
    pub fn new(pool: PgPool) -> Self {
        PgEventStore {
            shared: Arc::new(Shared {
                combiner: OnceLock::new(),
                counters: Arc::default(),
                wake: Wake::on_channel(pool.clone(), append::CHANNEL),
            }),
            pool,
            combining: true,
            poll_interval: DEFAULT_EVENT_POLL_INTERVAL,
        }
    }

    /// Whether concurrent [`EventStore::append`] calls share transactions
    /// (default true). An append alone is written at once either way; with
    /// combining, appends that arrive while a transaction runs are written
    /// together in the next one (one commit instead of one each), each
    /// checked against its own expected version.
    pub fn with_write_combining(mut self, on: bool) -> Self {
        self.combining = on;
        self
    }

    /// How often [`EventStore::wait_for_head`] looks without a notification.
    pub fn with_poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every;
        self
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Counters of the write path (shared by clones).
    pub fn write_stats(&self) -> WriteStats {
        let c = &self.shared.counters;
        WriteStats {
            transactions: c.transactions.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            largest_batch: c.largest.load(Ordering::Relaxed),
            queued: self.queued_appends() as u64,
            running: c.running.load(Ordering::Relaxed),
        }
    }

    /// Appends waiting for the combiner (0 without write combining).
    pub fn queued_appends(&self) -> usize {
        self.shared
            .combiner
            .get()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }

    /// Append `events` to `stream` inside the caller's transaction: they
    /// commit (or roll back) with the caller's business rows and outbox
    /// messages. As [`EventStore::append`] otherwise; a refused append
    /// leaves nothing in the transaction, which stays usable. The stream row
    /// stays locked until the caller's transaction ends, so keep it short.
    #[tracing::instrument(skip_all, fields(stream = %stream))]
    pub async fn append_in(
        &self,
        conn: &mut PgConnection,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendOutcome> {
        let item = checked(stream, expected, events)?;
        // Probe::Always: a unique violation would abort the caller's transaction
        let results = append::write(
            conn,
            std::slice::from_ref(&item),
            Locking::Wait,
            Probe::Always,
            true,
        )
        .await
        .map_err(db("append events"))?;
        only(results)
    }

    /// Give every committed append its position now (what readers do
    /// before reading); returns the head.
    pub async fn sequence(&self) -> Result<u64> {
        sequencer::sequence(&self.pool).await
    }

    fn combiner(&self) -> &mpsc::Sender<Request> {
        self.shared.combiner.get_or_init(|| {
            let (tx, rx) = mpsc::channel(append::QUEUE);
            let rx = Arc::new(tokio::sync::Mutex::new(rx));
            for _ in 0..append::COMBINERS {
                tokio::spawn(append::combine(
                    self.pool.clone(),
                    rx.clone(),
                    self.shared.counters.clone(),
                ));
            }
            tx
        })
    }

    async fn append_if_once(
        &self,
        item: &Item,
        condition: &AppendCondition,
        probe: Probe,
    ) -> std::result::Result<AppendOutcome, Failure> {
        // Number what is committed, so a failed condition can name the
        // position of the match (an append committed after this still
        // fails it, with position 0). Before the transaction: it takes a
        // connection of its own.
        sequencer::sequence_if_pending(&self.pool)
            .await
            .map_err(Failure::Custody)?;
        let mut tx = self.pool.begin().await?;
        let mut buckets = dcb::Buckets::default();
        buckets.condition(&condition.query);
        buckets.write(&item.events);
        if !buckets.is_empty() {
            let (keys, exclusive) = buckets.arrays();
            sqlx::query(dcb::LOCK)
                .bind(dcb::LOCK_CLASS)
                .bind(keys)
                .bind(exclusive)
                .execute(&mut *tx)
                .await?;
        }
        // With the exclusive locks held, no transaction is writing a
        // matching event: every one is committed and visible to this
        // statement. A committed one without a position yet counts too.
        if !condition.query.items.is_empty() {
            let (clause, binds) = query_clause(&condition.query, 2);
            let sql = format!(
                "SELECT coalesce(c.first_position + e.ordinal, 0) FROM custody_events e \
                 LEFT JOIN custody_event_commits c ON c.tx = e.tx \
                 WHERE (c.tx IS NULL OR c.first_position + e.ordinal > $1) AND ({clause}) \
                 ORDER BY c.tx IS NULL, 1 LIMIT 1"
            );
            let mut q = sqlx::query_scalar::<_, i64>(&sql).bind(i64_of(condition.after));
            for (types, tags) in binds {
                q = q.bind(types).bind(tags);
            }
            if let Some(position) = q.fetch_optional(&mut *tx).await? {
                return Ok(AppendOutcome::ConditionFailed {
                    position: u64_of(position),
                });
            }
        }
        let results = append::write(
            &mut tx,
            std::slice::from_ref(item),
            Locking::Wait,
            probe,
            false,
        )
        .await?;
        let outcome = match results.into_iter().next() {
            Some(ItemResult::Done(Ok(outcome))) => outcome,
            Some(ItemResult::Done(Err(e))) => return Err(Failure::Custody(e)),
            // Locking::Wait never defers
            _ => return Err(Failure::Custody(not_locked())),
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn read_events<'q>(
        &self,
        sql: &'q str,
        binder: impl FnOnce(SqlQuery<'q>) -> SqlQuery<'q>,
    ) -> Result<Vec<RecordedEvent>> {
        let rows = binder(sqlx::query(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(db(OP_READ))?;
        rows.iter().map(recorded).collect()
    }
}

type SqlQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn limit_of(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Validate an append's stream name and events.
fn checked(stream: &str, expected: ExpectedVersion, events: Vec<EventData>) -> Result<Item> {
    validate_stream_name(stream)?;
    let mut ids = std::collections::HashSet::with_capacity(events.len());
    for e in &events {
        e.validate()?;
        if !ids.insert(e.id) {
            return Err(Error::InvalidMessage(format!(
                "event id {} appears twice in one append to stream {stream:?}; give every event its own id",
                e.id
            )));
        }
    }
    Ok(Item {
        stream: stream.to_owned(),
        expected,
        events,
    })
}

fn only(results: Vec<ItemResult>) -> Result<AppendOutcome> {
    match results.into_iter().next() {
        Some(ItemResult::Done(outcome)) => outcome,
        _ => Err(not_locked()),
    }
}

/// An append that waits for its stream row came back without it (a bug).
fn not_locked() -> Error {
    Error::store(
        "postgres",
        "append events",
        true,
        "the stream row was not locked; retry the append",
    )
}

/// Why a try of a conditional append failed.
enum Failure {
    /// A statement failed (a unique violation is retried).
    Sql(sqlx::Error),
    /// Anything else, as it is.
    Custody(Error),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Sql(e)
    }
}

/// A query item's parameters: its types, its tags.
type ItemBinds = (Vec<String>, Vec<String>);

/// The SQL of a query's items (OR of them) on events `e`, with parameters
/// from `$first` on: per item, its types (any if empty) and its tags (all).
fn query_clause(query: &Query, first: usize) -> (String, Vec<ItemBinds>) {
    let mut parts = Vec::new();
    let mut binds = Vec::new();
    for (i, item) in query.items.iter().enumerate() {
        let t = first + 2 * i;
        parts.push(format!(
            "((cardinality(${t}::text[]) = 0 OR e.event_type = ANY(${t}::text[])) AND e.tags @> ${}::text[])",
            t + 1
        ));
        binds.push((item.types.clone(), item.tags.clone()));
    }
    if parts.is_empty() {
        parts.push("false".into());
    }
    (parts.join(" OR "), binds)
}

/// A row of `position, EVENT_COLUMNS`.
fn recorded(row: &PgRow) -> Result<RecordedEvent> {
    let get = |e: sqlx::Error| map_err(OP_READ, e);
    let position: Option<i64> = row.try_get("position").map_err(get)?;
    let headers: String = row.try_get("headers").map_err(get)?;
    let id = row.try_get("id").map_err(get)?;
    let headers = serde_json::from_str(&headers).map_err(|e| {
        Error::store(
            "postgres",
            OP_READ,
            false,
            format!("event {id}: its stored headers are not a JSON object of strings ({e}); was the row written by custody?"),
        )
    })?;
    let schema_version: i32 = row.try_get("schema_version").map_err(get)?;
    Ok(RecordedEvent {
        stream: row.try_get("stream").map_err(get)?,
        version: u64_of(row.try_get("version").map_err(get)?),
        position: u64_of(position.unwrap_or(0)),
        id,
        event_type: row.try_get("event_type").map_err(get)?,
        schema_version: u32::try_from(schema_version).unwrap_or(0),
        content_type: row.try_get("content_type").map_err(get)?,
        payload: row.try_get("payload").map_err(get)?,
        headers,
        tags: row.try_get("tags").map_err(get)?,
        recorded_at: row.try_get("recorded_at").map_err(get)?,
    })
}

fn metadata_of(stream: &str, value: serde_json::Value) -> Result<StreamMetadata> {
    serde_json::from_value(value).map_err(|e| {
        Error::store(
            "postgres",
            "read stream metadata",
            false,
            format!("stream {stream:?}: stored metadata does not decode ({e}); set it again with set_metadata"),
        )
    })
}

fn metadata_json(metadata: &StreamMetadata) -> Result<serde_json::Value> {
    serde_json::to_value(metadata)
        .map_err(|e| Error::InvalidMessage(format!("stream metadata does not encode as JSON: {e}")))
}

fn info_of(row: &PgRow) -> Result<StreamInfo> {
    let get = |e: sqlx::Error| map_err("read stream", e);
    let stream: String = row.try_get("stream").map_err(get)?;
    let metadata = metadata_of(&stream, row.try_get("metadata").map_err(get)?)?;
    let updated_at: DateTime<Utc> = row.try_get("updated_at").map_err(get)?;
    Ok(StreamInfo {
        version: u64_of(row.try_get("version").map_err(get)?),
        metadata,
        tombstoned: row.try_get("tombstoned").map_err(get)?,
        updated_at,
        stream,
    })
}

const STREAM_INFO: &str =
    "SELECT stream, version, metadata, tombstoned, updated_at FROM custody_streams WHERE stream = $1";

impl EventStore for PgEventStore {
    #[tracing::instrument(skip_all, fields(stream = %stream))]
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendOutcome> {
        let item = checked(stream, expected, events)?;
        if !self.combining {
            let c = &self.shared.counters;
            let running = c.running(1);
            let outcome = append::append_alone(&self.pool, &item).await;
            drop(running);
            c.committed(1);
            return outcome;
        }
        let (reply, outcome) = oneshot::channel();
        if let Err(mpsc::error::SendError(request)) =
            self.combiner().send(Request { item, reply }).await
        {
            // the combiner is gone (its runtime shut down): append alone
            return append::append_alone(&self.pool, &request.item).await;
        }
        outcome.await.map_err(|_| {
            Error::store(
                "postgres",
                "append events",
                true,
                "the write combiner stopped before answering; the append may or may not be \
                 written: retry it with the same event ids (a retry of a written append is idempotent)",
            )
        })?
    }

    #[tracing::instrument(skip_all, fields(stream = %stream))]
    async fn append_if(
        &self,
        stream: &str,
        condition: &AppendCondition,
        events: Vec<EventData>,
    ) -> Result<AppendOutcome> {
        const OP: &str = "conditional append";
        let item = checked(stream, ExpectedVersion::Any, events)?;
        let fail = |f: Failure| match f {
            Failure::Sql(e) => map_err(OP, e),
            Failure::Custody(e) => e,
        };
        let c = &self.shared.counters;
        let running = c.running(1);
        let outcome = match self
            .append_if_once(&item, condition, Probe::OnMismatch)
            .await
        {
            // an id stored already: decide again, looking the ids up first
            Err(Failure::Sql(sqlx::Error::Database(d))) if d.is_unique_violation() => self
                .append_if_once(&item, condition, Probe::Always)
                .await
                .map_err(fail),
            other => other.map_err(fail),
        };
        drop(running);
        c.committed(1);
        outcome
    }

    async fn read_stream(
        &self,
        stream: &str,
        direction: Direction,
        from: u64,
        limit: usize,
    ) -> Result<StreamRead> {
        validate_stream_name(stream)?;
        let Some(row) = sqlx::query(STREAM_INFO)
            .bind(stream)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("read stream"))?
        else {
            return Ok(StreamRead {
                events: Vec::new(),
                version: None,
                tombstoned: false,
            });
        };
        let info = info_of(&row)?;
        let lowest = info.metadata.truncate_before.unwrap_or(0);
        let (bound, order) = match direction {
            Direction::Forward => ("e.version >= $2", "ASC"),
            Direction::Backward => ("e.version <= $2", "DESC"),
        };
        // Every event up to info.version committed before the stream row
        // was read; one sequencing run after that gives them all positions.
        let sql = format!(
            "SELECT c.first_position + e.ordinal AS position, {EVENT_COLUMNS} \
             FROM custody_events e LEFT JOIN custody_event_commits c ON c.tx = e.tx \
             WHERE e.stream = $1 AND {bound} AND e.version >= $3 AND e.version <= $4 \
               AND ($5::float8 IS NULL OR e.recorded_at >= now() - make_interval(secs => $5)) \
             ORDER BY e.version {order} LIMIT $6"
        );
        let max_age = info.metadata.max_age.map(|d| d.as_secs_f64());
        let mut events = Vec::new();
        for attempt in 0..2 {
            if attempt == 1 {
                sequencer::sequence(&self.pool).await?;
            }
            events = self
                .read_events(&sql, |q| {
                    q.bind(stream.to_owned())
                        .bind(i64_of(from))
                        .bind(i64_of(lowest))
                        .bind(i64_of(info.version))
                        .bind(max_age)
                        .bind(limit_of(limit))
                })
                .await?;
            if events.iter().all(|e| e.position > 0) {
                break;
            }
        }
        Ok(StreamRead {
            events,
            version: Some(info.version).filter(|v| *v > 0 || info.tombstoned),
            tombstoned: info.tombstoned,
        })
    }

    async fn read_all(&self, after: u64, filter: &LogFilter, limit: usize) -> Result<LogSlice> {
        let head = self.head().await?;
        // Positions come from whole sequencing runs: every commit row with
        // a first position at or below the head read above is visible and
        // complete, and none with a higher one is read. Positions are dense,
        // so without a filter the page is exactly the positions after+1 ..
        // after+limit: bounding the commits by that too keeps a page's
        // work at one page whatever plan the server picks.
        let upto = if filter.categories.is_empty() && filter.types.is_empty() {
            head.min(after.saturating_add(u64::try_from(limit).unwrap_or(u64::MAX)))
        } else {
            head
        };
        let sql = format!(
            "SELECT c.first_position + e.ordinal AS position, {EVENT_COLUMNS} \
             FROM custody_event_commits c {PAGE_EVENTS} \
               AND (cardinality($3::text[]) = 0 OR split_part(e.stream, '-', 1) = ANY($3::text[])) \
               AND (cardinality($4::text[]) = 0 OR e.event_type = ANY($4::text[])) \
             {PAGE_END}"
        );
        let events = self
            .read_events(&sql, |q| {
                q.bind(i64_of(after))
                    .bind(i64_of(upto))
                    .bind(filter.categories.clone())
                    .bind(filter.types.clone())
                    .bind(limit_of(limit))
            })
            .await?;
        Ok(slice(events, after, head, limit))
    }

    async fn read_query(&self, query: &Query, after: u64, limit: usize) -> Result<LogSlice> {
        let head = self.head().await?;
        let (clause, binds) = query_clause(query, 4);
        let sql = format!(
            "SELECT c.first_position + e.ordinal AS position, {EVENT_COLUMNS} \
             FROM custody_event_commits c {PAGE_EVENTS} AND ({clause}) {PAGE_END_3}"
        );
        let events = self
            .read_events(&sql, |q| {
                let mut q = q
                    .bind(i64_of(after))
                    .bind(i64_of(head))
                    .bind(limit_of(limit));
                for (types, tags) in binds {
                    q = q.bind(types).bind(tags);
                }
                q
            })
            .await?;
        Ok(slice(events, after, head, limit))
    }

    async fn head(&self) -> Result<u64> {
        sequencer::head(&self.pool).await
    }

    async fn wait_for_head(&self, after: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        let waiter = Waiter::new(self.shared.wake.clone());
        loop {
            // forget notifications older than this look at the head
            waiter.catch_up();
            let head = self.head().await?;
            let now = Instant::now();
            if head > after || now >= deadline {
                return Ok(head);
            }
            waiter.wait((deadline - now).min(self.poll_interval)).await;
        }
    }

    async fn stream_info(&self, stream: &str) -> Result<Option<StreamInfo>> {
        validate_stream_name(stream)?;
        let row = sqlx::query(STREAM_INFO)
            .bind(stream)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("read stream"))?;
        row.as_ref().map(info_of).transpose()
    }

    async fn set_metadata(&self, stream: &str, metadata: &StreamMetadata) -> Result<()> {
        validate_stream_name(stream)?;
        sqlx::query(
            "INSERT INTO custody_streams (stream, category, metadata) VALUES ($1, $2, $3) \
             ON CONFLICT (stream) DO UPDATE SET metadata = EXCLUDED.metadata, updated_at = now()",
        )
        .bind(stream)
        .bind(category_of(stream))
        .bind(metadata_json(metadata)?)
        .execute(&self.pool)
        .await
        .map_err(db("set stream metadata"))?;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(stream = %stream))]
    async fn delete_stream(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        mode: DeleteMode,
    ) -> Result<AppendOutcome> {
        const OP: &str = "delete stream";
        validate_stream_name(stream)?;
        let mut tx = self.pool.begin().await.map_err(db(OP))?;
        // the same lock as appends: a delete and an append take turns
        let row = sqlx::query(
            "INSERT INTO custody_streams AS cs (stream, category) VALUES ($1, $2) \
             ON CONFLICT (stream) DO UPDATE SET updated_at = cs.updated_at \
             RETURNING stream, version, metadata, tombstoned, updated_at",
        )
        .bind(stream)
        .bind(category_of(stream))
        .fetch_one(&mut *tx)
        .await
        .map_err(db(OP))?;
        let info = info_of(&row)?;
        if info.tombstoned {
            return Ok(AppendOutcome::Tombstoned);
        }
        let actual = Some(info.version).filter(|v| *v > 0);
        if !expected.matches(actual) {
            return Ok(AppendOutcome::WrongVersion { expected, actual });
        }
        let mut metadata = info.metadata;
        metadata.truncate_before = Some(info.version + 1);
        sqlx::query(
            "UPDATE custody_streams SET metadata = $2, tombstoned = $3, updated_at = now() \
             WHERE stream = $1",
        )
        .bind(stream)
        .bind(metadata_json(&metadata)?)
        .bind(mode == DeleteMode::Tombstone)
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;
        tx.commit().await.map_err(db(OP))?;
        Ok(AppendOutcome::Appended(Appended {
            first_version: info.version + 1,
            version: info.version,
            idempotent: false,
        }))
    }

    async fn streams(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StreamInfo>> {
        // byte order ("name order" on every backend), not the database's collation
        let rows = sqlx::query(
            "SELECT stream, version, metadata, tombstoned, updated_at FROM custody_streams \
             WHERE starts_with(stream, $1) AND ($2::text IS NULL OR stream COLLATE \"C\" > $2) \
             ORDER BY stream COLLATE \"C\" LIMIT $3",
        )
        .bind(prefix)
        .bind(after)
        .bind(limit_of(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("list streams"))?;
        rows.iter().map(info_of).collect()
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        validate_stream_name(&snapshot.stream)?;
        sqlx::query(
            "INSERT INTO custody_event_snapshots \
             (stream, aggregate, schema_version, version, state, taken_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (stream, aggregate) DO UPDATE SET schema_version = EXCLUDED.schema_version, \
             version = EXCLUDED.version, state = EXCLUDED.state, taken_at = EXCLUDED.taken_at",
        )
        .bind(&snapshot.stream)
        .bind(&snapshot.aggregate)
        .bind(i32::try_from(snapshot.schema_version).unwrap_or(i32::MAX))
        .bind(i64_of(snapshot.version))
        .bind(&snapshot.state)
        .bind(snapshot.taken_at)
        .execute(&self.pool)
        .await
        .map_err(db("save snapshot"))?;
        Ok(())
    }

    async fn load_snapshot(&self, stream: &str, aggregate: &str) -> Result<Option<Snapshot>> {
        const OP: &str = "load snapshot";
        let row = sqlx::query(
            "SELECT schema_version, version, state, taken_at FROM custody_event_snapshots \
             WHERE stream = $1 AND aggregate = $2",
        )
        .bind(stream)
        .bind(aggregate)
        .fetch_optional(&self.pool)
        .await
        .map_err(db(OP))?;
        let Some(row) = row else { return Ok(None) };
        let schema_version: i32 = row.try_get("schema_version").map_err(db(OP))?;
        Ok(Some(Snapshot {
            stream: stream.to_owned(),
            aggregate: aggregate.to_owned(),
            schema_version: u32::try_from(schema_version).unwrap_or(0),
            version: u64_of(row.try_get("version").map_err(db(OP))?),
            state: row.try_get("state").map_err(db(OP))?,
            taken_at: row.try_get("taken_at").map_err(db(OP))?,
        }))
    }
}

/// A log slice: `scanned_to` is the last event's position when the limit
/// cut the read short, else the head (everything up to it was looked at).
fn slice(events: Vec<RecordedEvent>, after: u64, head: u64, limit: usize) -> LogSlice {
    let scanned_to = if events.len() >= limit {
        events.last().map_or(after.min(head), |e| e.position)
    } else {
        head
    };
    LogSlice {
        events,
        scanned_to,
        head,
    }
}
