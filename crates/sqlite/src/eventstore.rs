//! The event store on SQLite ([`SqliteEventStore`]), in the custody
//! database file beside the outbox (migration 0009, docs/EVENTSTORE.md).
//!
//! # Ordering
//!
//! Positions are `INTEGER PRIMARY KEY` values assigned at insert. SQLite runs
//! one write transaction at a time and holds the write lock from the
//! transaction's first write to its commit, so positions become visible in
//! commit order: the largest visible position is the gap-free head, and a
//! reader may read `WHERE position > last` without a visibility guard
//! (docs/ARCHITECTURE.md invariant 5). The same single writer makes a
//! check-then-insert atomic inside `BEGIN IMMEDIATE`: an expected-version
//! check and an [`AppendCondition`] cannot be overtaken by another writer.
//!
//! # Write combining
//!
//! [`EventStore::append`] and [`EventStore::append_if`] hand their write to
//! one task per store (shared by clones), which takes every write queued at
//! that moment and runs them in one `BEGIN IMMEDIATE` transaction, each in
//! its own SAVEPOINT: one commit (one fsync) for many appends, each append
//! checked and refused on its own. A lone append does not wait for company.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use custody_core::event::{
    category_of, validate_stream_name, AppendCondition, AppendOutcome, Appended, DeleteMode,
    Direction, EventData, EventStore, ExpectedVersion, LogFilter, LogSlice, Query, RecordedEvent,
    Snapshot, StreamInfo, StreamMetadata, StreamRead,
};
use custody_core::{Clock, SystemClock};
use custody_core::{Error, Result};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::duration_ms;
use crate::error::{map_err, store_error};

const BACKEND: &str = "sqlite";

/// Most events per multi-row `INSERT`: 10 bound parameters each, 2,560
/// in all, well under the 32,766 of the SQLite that sqlx bundles (3.32 and
/// later). A power of two: an append is split into statements of
/// power-of-two sizes, so a connection caches at most 9 insert statements
/// whatever the sizes of the appends (see [`insert_sql`]).
const ROWS_PER_INSERT: usize = 256;

/// Most writes one combined transaction takes.
const MAX_COMBINED: usize = 512;

/// Queued writes before `append` waits for room (back-pressure).
const QUEUE: usize = 1024;

/// Positions a filtered `read_all` scans at most per call: a rare category
/// must not turn one call into a scan of the whole log; the reader goes on
/// from `scanned_to`.
const SCAN_WINDOW: u64 = 65_536;

/// Default poll interval of [`EventStore::wait_for_head`] for commits of
/// other processes (and of [`SqliteEventStore::append_in`] transactions).
const DEFAULT_POLL: Duration = Duration::from_millis(50);

const EVENT_COLUMNS: &str = "position, stream, version, id, event_type, schema_version, \
     content_type, payload, headers, tags, recorded_at";

/// Open the append's savepoint and read the stream's state, in one round
/// trip to sqlx's connection thread (a combined transaction runs many
/// appends; each trip is a hand-over between threads).
///
/// The state is read taking the write lock first: a no-op UPDATE is a
/// write, so in a deferred transaction (a caller's `pool.begin()`) SQLite
/// takes the write lock here, before anything is read, and the version read
/// cannot be stale by the time the events are inserted.
const SAVEPOINT_STREAM_STATE: &str = "SAVEPOINT custody_append; \
     UPDATE custody_streams SET version = version \
     WHERE stream = ?1 RETURNING version, tombstoned";

/// Move the stream's version and release the append's savepoint (keeping
/// the append), in one round trip. When the upsert fails the RELEASE does
/// not run and the savepoint is still there to roll back to.
const UPSERT_STREAM_VERSION_RELEASE: &str = "INSERT INTO custody_streams \
     (stream, category, version, updated_at) VALUES (?1, ?2, ?3, ?4) \
     ON CONFLICT (stream) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at; \
     RELEASE custody_append";

/// Tags of the events just appended to `?1` above version `?2`.
/// OR IGNORE: an event may carry a tag twice.
const INSERT_TAGS: &str = "INSERT OR IGNORE INTO custody_event_tags (tag, position) \
     SELECT j.value, e.position FROM custody_events AS e, json_each(e.tags) AS j \
     WHERE e.stream = ?1 AND e.version > ?2 AND e.tags IS NOT NULL";

/// The gap-free head: every committed position is visible (single writer,
/// see the module doc), so the largest visible one is the head.
const HEAD: &str = "SELECT COALESCE(MAX(position), 0) FROM custody_events";

const STREAM_INFO: &str = "SELECT stream, version, truncate_before, max_age_ms, metadata, \
     tombstoned, updated_at FROM custody_streams WHERE stream = ?1";

const SET_METADATA: &str = "INSERT INTO custody_streams \
     (stream, category, version, truncate_before, max_age_ms, metadata, updated_at) \
     VALUES (?1, ?2, 0, ?3, ?4, ?5, ?6) \
     ON CONFLICT (stream) DO UPDATE SET truncate_before = excluded.truncate_before, \
     max_age_ms = excluded.max_age_ms, metadata = excluded.metadata, updated_at = excluded.updated_at";

/// Soft delete / tombstone: hide every event up to the current version.
const DELETE_STREAM: &str = "INSERT INTO custody_streams \
     (stream, category, version, truncate_before, tombstoned, updated_at) \
     VALUES (?1, ?2, ?3, ?3 + 1, ?4, ?5) \
     ON CONFLICT (stream) DO UPDATE SET truncate_before = excluded.truncate_before, \
     tombstoned = MAX(tombstoned, excluded.tombstoned), updated_at = excluded.updated_at";

const SAVE_SNAPSHOT: &str = "INSERT INTO custody_event_snapshots \
     (stream, aggregate, schema_version, version, state, taken_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
     ON CONFLICT (stream, aggregate) DO UPDATE SET schema_version = excluded.schema_version, \
     version = excluded.version, state = excluded.state, taken_at = excluded.taken_at";

const LOAD_SNAPSHOT: &str = "SELECT stream, aggregate, schema_version, version, state, taken_at \
     FROM custody_event_snapshots WHERE stream = ?1 AND aggregate = ?2";

/// The category of `stream` in SQL, as [`category_of`] computes it.
const CATEGORY_SQL: &str =
    "(CASE WHEN instr(stream, '-') > 0 THEN substr(stream, 1, instr(stream, '-') - 1) ELSE stream END)";

pub use custody_core::event::WriteStats;

#[derive(Debug, Default)]
struct Stats {
    transactions: AtomicU64,
    writes: AtomicU64,
    largest: AtomicU64,
    running: AtomicU64,
}

impl Stats {
    fn record(&self, writes: usize) {
        let w = writes as u64;
        self.transactions.fetch_add(1, Ordering::Relaxed);
        self.writes.fetch_add(w, Ordering::Relaxed);
        self.largest.fetch_max(w, Ordering::Relaxed);
    }
}

/// What every clone of a store shares.
struct Shared {
    notify: Notify,
    stats: Stats,
    /// The combining task's queue, started by the first combined write.
    combiner: OnceLock<mpsc::Sender<Job>>,
    /// Stops the combining task; cancelled when the last handle goes.
    stop: CancellationToken,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// The event store on SQLite. See the module documentation of
/// `custody_sqlite` and docs/EVENTSTORE.md.
///
/// Clones share the pool, the in-process wake-up of
/// [`EventStore::wait_for_head`] and the write-combining task.
#[derive(Clone)]
pub struct SqliteEventStore {
    pool: SqlitePool,
    shared: Arc<Shared>,
    combining: bool,
    poll: Duration,
    clock: Arc<dyn Clock>,
    /// The caller's shutdown token ([`SqliteEventStore::with_shutdown`]).
    shutdown: Option<CancellationToken>,
}

impl std::fmt::Debug for SqliteEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteEventStore")
            .field("combining", &self.combining)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

/// One write for the combining task.
enum Write {
    Append {
        stream: String,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    },
    AppendIf {
        stream: String,
        condition: AppendCondition,
        events: Vec<EventData>,
    },
}

struct Job {
    write: Write,
    reply: oneshot::Sender<Result<AppendOutcome>>,
}

impl SqliteEventStore {
    /// An event store on `pool` (migrated with [`crate::migrate`]), with
    /// write combining on.
    pub fn new(pool: SqlitePool) -> Self {
        SqliteEventStore {
            pool,
            shared: Arc::new(Shared {
                notify: Notify::new(),
                stats: Stats::default(),
                combiner: OnceLock::new(),
                stop: CancellationToken::new(),
            }),
            combining: true,
            poll: DEFAULT_POLL,
            clock: Arc::new(SystemClock),
            shutdown: None,
        }
    }

    /// Combine concurrent appends into one transaction (`true`, the
    /// default) or give every append its own transaction (`false`; for
    /// comparisons).
    #[must_use]
    pub fn with_write_combining(mut self, on: bool) -> Self {
        self.combining = on;
        self
    }

    /// How often [`EventStore::wait_for_head`] looks for commits it was not
    /// woken for (other processes, [`Self::append_in`]); default 50 ms.
    #[must_use]
    pub fn with_poll_interval(mut self, every: Duration) -> Self {
        self.poll = every.max(Duration::from_millis(1));
        self
    }

    /// Take `recorded_at` and the max-age cut-off from `clock` instead of
    /// the system clock.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Stop the write-combining task when `token` is cancelled (it also
    /// stops when the last clone is dropped). Writes already queued are
    /// finished; later ones run in their own transaction. Give it before
    /// the first append: the task is started by the first combined write,
    /// with the token of the handle that made it.
    #[must_use]
    pub fn with_shutdown(mut self, token: CancellationToken) -> Self {
        self.shutdown = Some(token);
        self
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// What the write path has done so far (shared by clones): how many
    /// transactions carried how many writes.
    pub fn write_stats(&self) -> WriteStats {
        let s = &self.shared.stats;
        WriteStats {
            transactions: s.transactions.load(Ordering::Relaxed),
            writes: s.writes.load(Ordering::Relaxed),
            largest_batch: s.largest.load(Ordering::Relaxed),
            queued: self
                .shared
                .combiner
                .get()
                .map_or(0, |tx| (tx.max_capacity() - tx.capacity()) as u64),
            running: s.running.load(Ordering::Relaxed),
        }
    }

    /// Wake this process's [`EventStore::wait_for_head`] waiters (after
    /// committing an [`Self::append_in`] transaction; otherwise they see it
    /// at their next poll).
    pub fn notify(&self) {
        self.shared.notify.notify_waiters();
    }

    /// Append on `conn`, normally the caller's transaction (`&mut *tx`), so
    /// business rows, events and outbox messages
    /// (`SqliteOutbox::enqueue`) commit together or not at all. Same
    /// contract as [`EventStore::append`]; a refused append leaves nothing
    /// of itself in the transaction (it runs in a SAVEPOINT).
    ///
    /// Start the transaction with `pool.begin_with("BEGIN IMMEDIATE")` when
    /// it reads before it writes: a deferred transaction that has read may
    /// not be allowed to write when another connection committed meanwhile
    /// (SQLite's busy snapshot, a retryable error).
    pub async fn append_in(
        &self,
        conn: &mut SqliteConnection,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendOutcome> {
        validate(stream, &events)?;
        let now = self.now_ms();
        savepoint(conn, stream, expected, &events, now, None)
            .await
            .map_err(SpError::into_error)
    }

    fn now_ms(&self) -> i64 {
        self.clock.now().timestamp_millis()
    }

    /// Run `write` through the combining task, or alone.
    async fn write(&self, write: Write) -> Result<AppendOutcome> {
        let job_write = if self.combining {
            match self.combiner() {
                Some(tx) => {
                    let (reply, rx) = oneshot::channel();
                    match tx.send(Job { write, reply }).await {
                        Ok(()) => {
                            return rx.await.unwrap_or_else(|_| {
                                Err(Error::store(
                                    BACKEND,
                                    "append",
                                    true,
                                    "the write-combining task stopped before answering; the append may or may not have committed: re-append with the same event ids (idempotent)",
                                ))
                            })
                        }
                        // the task has stopped: write alone
                        Err(mpsc::error::SendError(job)) => job.write,
                    }
                }
                None => write,
            }
        } else {
            write
        };
        let (reply, rx) = oneshot::channel();
        run_batch(
            &self.pool,
            vec![Job {
                write: job_write,
                reply,
            }],
            self.now_ms(),
            &self.shared,
        )
        .await;
        rx.await.unwrap_or_else(|_| {
            Err(Error::store(
                BACKEND,
                "append",
                false,
                "append lost its answer",
            ))
        })
    }

    /// The combining task's queue, starting the task on first use (needs a
    /// tokio runtime; `None` when stopped).
    fn combiner(&self) -> Option<&mpsc::Sender<Job>> {
        if self.shared.stop.is_cancelled()
            || self.shutdown.as_ref().is_some_and(|t| t.is_cancelled())
        {
            return None;
        }
        Some(self.shared.combiner.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            // The task holds no handle of the store (only what it needs), so
            // dropping the last handle cancels `stop` and ends it.
            let shared = Arc::downgrade(&self.shared);
            tokio::spawn(combine(
                self.pool.clone(),
                rx,
                self.shared.stop.clone(),
                self.shutdown.clone().unwrap_or_default(),
                shared,
                self.clock.clone(),
            ));
            tx
        }))
    }

    async fn head_on(&self) -> Result<u64> {
        let h: i64 = sqlx::query_scalar(HEAD)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err("read event log head"))?;
        Ok(to_u64(h))
    }
}

/// The combining loop: take what is queued, run it in one transaction.
async fn combine(
    pool: SqlitePool,
    mut rx: mpsc::Receiver<Job>,
    stop: CancellationToken,
    shutdown: CancellationToken,
    shared: std::sync::Weak<Shared>,
    clock: Arc<dyn Clock>,
) {
    let mut stopping = false;
    loop {
        let first = if stopping {
            rx.recv().await
        } else {
            tokio::select! {
                biased;
                job = rx.recv() => job,
                _ = stop.cancelled() => {
                    stopping = true;
                    rx.close();
                    continue;
                }
                _ = shutdown.cancelled() => {
                    // finish what is queued, accept nothing more
                    stopping = true;
                    rx.close();
                    continue;
                }
            }
        };
        let Some(first) = first else { return };
        let mut batch = vec![first];
        while batch.len() < MAX_COMBINED {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let now = clock.now().timestamp_millis();
        match shared.upgrade() {
            Some(shared) => run_batch(&pool, batch, now, &shared).await,
            None => {
                for job in batch {
                    let _ = job.reply.send(Err(Error::Shutdown));
                }
            }
        }
    }
}

/// Run `jobs` in one `BEGIN IMMEDIATE` transaction, each in its own
/// savepoint, and answer each.
async fn run_batch(pool: &SqlitePool, jobs: Vec<Job>, now: i64, shared: &Shared) {
    const OP: &str = "append events";
    let n = jobs.len();
    shared.stats.running.store(n as u64, Ordering::Relaxed);
    let mut results: Vec<Option<Result<AppendOutcome>>> = Vec::with_capacity(n);
    let fatal: Result<()> = async {
        let mut conn = pool.acquire().await.map_err(map_err(OP))?;
        // BEGIN IMMEDIATE: the write lock from the start, so every check in
        // this transaction sees the latest committed state and nothing can
        // commit between a check and its insert (single writer).
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *conn)
            .await
            .map_err(map_err(OP))?;
        let run: Result<()> = async {
            for job in &jobs {
                let r = match &job.write {
                    Write::Append {
                        stream,
                        expected,
                        events,
                    } => savepoint(&mut conn, stream, *expected, events, now, None).await,
                    Write::AppendIf {
                        stream,
                        condition,
                        events,
                    } => {
                        savepoint(
                            &mut conn,
                            stream,
                            ExpectedVersion::Any,
                            events,
                            now,
                            Some(condition),
                        )
                        .await
                    }
                };
                match r {
                    Err(e) if e.is_savepoint_failure() => return Err(e.into_error()),
                    Err(e) => results.push(Some(Err(e.into_error()))),
                    Ok(o) => results.push(Some(Ok(o))),
                }
            }
            Ok(())
        }
        .await;
        match run {
            Ok(()) => {
                sqlx::query("COMMIT")
                    .execute(&mut *conn)
                    .await
                    .map_err(map_err(OP))?;
                Ok(())
            }
            Err(e) => {
                let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
                Err(e)
            }
        }
    }
    .await;
    shared.stats.running.store(0, Ordering::Relaxed);
    match fatal {
        Ok(()) => {
            shared.stats.record(n);
            for (job, r) in jobs.into_iter().zip(results) {
                let r = r.unwrap_or_else(|| Err(Error::store(BACKEND, OP, false, "no result")));
                let _ = job.reply.send(r);
            }
            shared.notify.notify_waiters();
        }
        Err(e) => {
            // Error is not Clone: every writer gets the same text and class.
            let retry = e.retryable();
            let text = e.to_string();
            for job in jobs {
                let _ = job.reply.send(Err(Error::store(
                    BACKEND,
                    OP,
                    retry,
                    format!("{text} (nothing of this transaction was committed; the append can be retried with the same event ids)"),
                )));
            }
        }
    }
}

/// An error inside a savepoint: `Failed` when the savepoint was rolled
/// back cleanly (the transaction is usable), `Broken` when even that
/// failed (the whole transaction must be rolled back).
enum SpError {
    Failed(Error),
    Broken(Error),
}

impl SpError {
    fn is_savepoint_failure(&self) -> bool {
        matches!(self, SpError::Broken(_))
    }
    fn into_error(self) -> Error {
        match self {
            SpError::Failed(e) | SpError::Broken(e) => e,
        }
    }
}

impl From<SpError> for Error {
    fn from(e: SpError) -> Self {
        e.into_error()
    }
}

/// Run the append in a SAVEPOINT: kept when it appended events, rolled
/// back otherwise (a refused or failed append leaves nothing behind).
async fn savepoint(
    conn: &mut SqliteConnection,
    stream: &str,
    expected: ExpectedVersion,
    events: &[EventData],
    now: i64,
    condition: Option<&AppendCondition>,
) -> std::result::Result<AppendOutcome, SpError> {
    const OP: &str = "append events (savepoint)";
    let state: std::result::Result<Option<(i64, bool)>, sqlx::Error> =
        sqlx::query_as(SAVEPOINT_STREAM_STATE)
            .bind(stream)
            .fetch_optional(&mut *conn)
            .await;
    let r = match state {
        Ok(state) => append_core(&mut *conn, state, stream, expected, events, now, condition).await,
        // When the SAVEPOINT itself failed, the ROLLBACK TO below fails
        // too and the error is `Broken`, as it must be.
        Err(e) => Err(store_error("append events", e)),
    };
    if let Ok(Kept::Released(outcome)) = r {
        return Ok(outcome);
    }
    // One trip: a refused or failed append leaves nothing of itself.
    if let Err(e) = sqlx::query("ROLLBACK TO custody_append; RELEASE custody_append")
        .execute(&mut *conn)
        .await
    {
        // When the append failed, its own error says what happened (if the
        // SAVEPOINT was what failed, the rollback fails for want of it).
        return Err(SpError::Broken(match r {
            Err(failed) => failed,
            Ok(_) => store_error(OP, e),
        }));
    }
    match r {
        Ok(Kept::Released(outcome) | Kept::RolledBack(outcome)) => Ok(outcome),
        Err(e) => Err(SpError::Failed(e)),
    }
}

/// What [`append_core`] did with the savepoint.
enum Kept {
    /// The append wrote and released the savepoint (its last statement).
    Released(AppendOutcome),
    /// Nothing to keep: the savepoint is to be rolled back.
    RolledBack(AppendOutcome),
}

/// Check names and events before anything is written.
fn validate(stream: &str, events: &[EventData]) -> Result<()> {
    validate_stream_name(stream)?;
    let mut seen = HashSet::with_capacity(events.len());
    for e in events {
        e.validate()?;
        if !seen.insert(e.id) {
            return Err(Error::InvalidMessage(format!(
                "event id {} appears twice in one append to stream {stream:?}; give every event its own id",
                e.id
            )));
        }
        if e.schema_version > i32::MAX as u32 {
            return Err(Error::InvalidMessage(format!(
                "event {} ({:?}): schema version {} is too large (at most {})",
                e.id,
                e.event_type,
                e.schema_version,
                i32::MAX
            )));
        }
    }
    Ok(())
}

/// The append itself, inside the savepoint `custody_append` that
/// [`savepoint`] opened with the write lock taken (`state`: the stream's
/// version and tombstone, read under it). When it appends, its last
/// statement releases the savepoint.
async fn append_core(
    conn: &mut SqliteConnection,
    state: Option<(i64, bool)>,
    stream: &str,
    expected: ExpectedVersion,
    events: &[EventData],
    now: i64,
    condition: Option<&AppendCondition>,
) -> Result<Kept> {
    const OP: &str = "append events";
    let kept = Kept::RolledBack;
    if state.is_some_and(|(_, t)| t) {
        return Ok(kept(AppendOutcome::Tombstoned));
    }
    let current = state.map_or(0, |(v, _)| to_u64(v));
    let actual = (current > 0).then_some(current);
    if let Some(condition) = condition {
        // Under the write lock: no event can be appended between this check
        // and the insert below, so two conditional appends whose queries
        // overlap cannot both pass (docs/EVENTSTORE.md, DCB).
        let hit = query_events(&mut *conn, &condition.query, condition.after, None, 1)
            .await?
            .into_iter()
            .next();
        if let Some(e) = hit {
            // idempotent retry of an append that already passed
            if let Some(done) = replayed(conn, stream, expected, events).await? {
                return Ok(kept(done));
            }
            return Ok(kept(AppendOutcome::ConditionFailed {
                position: e.position,
            }));
        }
    }
    if events.is_empty() {
        // nothing written (the no-op UPDATE aside): nothing to keep
        return Ok(kept(if expected.matches(actual) {
            AppendOutcome::Appended(Appended {
                first_version: current + 1,
                version: current,
                idempotent: false,
            })
        } else {
            AppendOutcome::WrongVersion { expected, actual }
        }));
    }
    if !expected.matches(actual) {
        return Ok(kept(
            replayed(conn, stream, expected, events)
                .await?
                .unwrap_or(AppendOutcome::WrongVersion { expected, actual }),
        ));
    }
    let last = current + events.len() as u64;
    let appended = AppendOutcome::Appended(Appended {
        first_version: current + 1,
        version: last,
        idempotent: false,
    });
    let tagged = events.iter().any(|e| !e.tags.is_empty());
    // Untagged: the last INSERT also moves the version and releases the
    // savepoint (one round trip less).
    match insert_events(conn, stream, current, events, now, !tagged).await {
        Ok(true) => return Ok(Kept::Released(appended)),
        Ok(false) => {}
        Err(e) if is_unique_violation(&e) => {
            // An id is already stored: a retried append, or a reused id.
            // (The failed statement undid itself; the savepoint undoes the
            // earlier chunks.)
            return match replayed(conn, stream, expected, events).await? {
                Some(done) => Ok(kept(done)),
                None => Err(store_error(OP, e)),
            };
        }
        Err(e) => return Err(store_error(OP, e)),
    }
    if tagged {
        sqlx::query(INSERT_TAGS)
            .bind(stream)
            .bind(to_i64(current))
            .execute(&mut *conn)
            .await
            .map_err(map_err(OP))?;
    }
    sqlx::query(UPSERT_STREAM_VERSION_RELEASE)
        .bind(stream)
        .bind(category_of(stream))
        .bind(to_i64(last))
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(map_err(OP))?;
    Ok(Kept::Released(appended))
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Whether `events` are already stored: `Some(idempotent outcome)` when all
/// are in `stream` at consecutive versions this append could have given
/// them, `Some(WrongVersion)` when some are stored elsewhere in the stream,
/// `None` when none is stored. An id stored in another stream is an error.
async fn replayed(
    conn: &mut SqliteConnection,
    stream: &str,
    expected: ExpectedVersion,
    events: &[EventData],
) -> Result<Option<AppendOutcome>> {
    const OP: &str = "append events (look up event ids)";
    let mut found: HashMap<Uuid, (String, u64)> = HashMap::new();
    for chunk in events.chunks(500) {
        let mut sql = String::from("SELECT id, stream, version FROM custody_events WHERE id IN (");
        for i in 0..chunk.len() {
            sql.push_str(if i == 0 { "?" } else { ", ?" });
        }
        sql.push(')');
        let mut q = sqlx::query_as::<_, (Uuid, String, i64)>(&sql);
        for e in chunk {
            q = q.bind(e.id);
        }
        for (id, s, v) in q.fetch_all(&mut *conn).await.map_err(map_err(OP))? {
            found.insert(id, (s, to_u64(v)));
        }
    }
    if found.is_empty() {
        return Ok(None);
    }
    if let Some((id, (other, v))) = found.iter().find(|(_, (s, _))| s != stream) {
        return Err(Error::InvalidMessage(format!(
            "event id {id} is already stored in stream {other:?} at version {v}; event ids are unique across the store: give the event for stream {stream:?} a fresh id"
        )));
    }
    let state: Option<(i64,)> =
        sqlx::query_as("SELECT version FROM custody_streams WHERE stream = ?1")
            .bind(stream)
            .fetch_optional(&mut *conn)
            .await
            .map_err(map_err(OP))?;
    let actual = state.map(|(v,)| to_u64(v)).filter(|v| *v > 0);
    let wrong = AppendOutcome::WrongVersion { expected, actual };
    let Some(first) = found.get(&events[0].id).map(|(_, v)| *v) else {
        return Ok(Some(wrong));
    };
    let in_place = events.iter().enumerate().all(|(i, e)| {
        found
            .get(&e.id)
            .is_some_and(|(_, v)| *v == first + i as u64)
    });
    let allowed = match expected {
        ExpectedVersion::Exact(n) => first == n + 1,
        ExpectedVersion::NoStream => first == 1,
        ExpectedVersion::Any | ExpectedVersion::StreamExists => true,
    };
    Ok(Some(if in_place && allowed {
        AppendOutcome::Appended(Appended {
            first_version: first,
            version: first + events.len() as u64 - 1,
            idempotent: true,
        })
    } else {
        wrong
    }))
}

/// Multi-row INSERTs of [`ROWS_PER_INSERT`] events, the rest in
/// statements of power-of-two sizes (1000 = 3 × 256 + 128 + 64 + 32 + 8).
///
/// With `finish`, the last statement also sets the stream's version and
/// releases the savepoint `custody_append` (returns `true`): when an
/// INSERT fails, what follows it in the statement does not run.
async fn insert_events(
    conn: &mut SqliteConnection,
    stream: &str,
    current: u64,
    events: &[EventData],
    now: i64,
    finish: bool,
) -> std::result::Result<bool, sqlx::Error> {
    let mut version = current;
    let mut rest = events;
    let mut released = false;
    while !rest.is_empty() {
        let rows = if rest.len() >= ROWS_PER_INSERT {
            ROWS_PER_INSERT
        } else {
            // the largest power of two not above what is left
            1 << rest.len().ilog2()
        };
        let (chunk, tail) = rest.split_at(rows);
        rest = tail;
        let last = finish && rest.is_empty();
        let mut q = sqlx::query(insert_sql(rows, last));
        for e in chunk {
            version += 1;
            let headers = if e.headers.is_empty() {
                None
            } else {
                serde_json::to_string(&e.headers).ok()
            };
            let tags = if e.tags.is_empty() {
                None
            } else {
                serde_json::to_string(&e.tags).ok()
            };
            q = q
                .bind(stream)
                .bind(to_i64(version))
                .bind(e.id)
                .bind(e.event_type.as_str())
                .bind(i64::from(e.schema_version))
                .bind(e.content_type.as_str())
                .bind(e.payload.as_slice())
                .bind(headers)
                .bind(tags)
                .bind(now);
        }
        if last {
            q = q
                .bind(stream)
                .bind(category_of(stream))
                .bind(to_i64(version))
                .bind(now);
            released = true;
        }
        q.execute(&mut *conn).await?;
    }
    Ok(released)
}

/// `INSERT … VALUES` for `rows` events, `rows` a power of two up to
/// [`ROWS_PER_INSERT`], followed with `finish` by the stream version's
/// upsert and the savepoint's release (see [`insert_events`]); built once
/// per process.
///
/// Anonymous `?` parameters, each row binding all ten columns, and not
/// numbered ones (`?1` for the stream shared by every row): sqlx looks up
/// the name of every numbered parameter with
/// `sqlite3_bind_parameter_name`, a linear search of the statement's
/// parameter list, so numbered parameters cost time quadratic in the rows
/// of a statement (most of an append's CPU at 120 rows per statement).
fn insert_sql(rows: usize, finish: bool) -> &'static str {
    const SIZES: usize = ROWS_PER_INSERT.ilog2() as usize + 1;
    static SQL: [[OnceLock<String>; SIZES]; 2] = [const { [const { OnceLock::new() }; SIZES] }; 2];
    debug_assert!(rows.is_power_of_two() && rows <= ROWS_PER_INSERT);
    let slot = (rows.ilog2() as usize).min(SIZES - 1);
    SQL[usize::from(finish)][slot].get_or_init(|| {
        let mut sql = String::from(
            "INSERT INTO custody_events (stream, version, id, event_type, schema_version, \
             content_type, payload, headers, tags, recorded_at) VALUES ",
        );
        for r in 0..(1usize << slot) {
            if r > 0 {
                sql.push_str(", ");
            }
            sql.push_str("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
        }
        if finish {
            // anonymous parameters too: they follow the rows' (sqlx numbers
            // a statement's anonymous parameters on from the previous one's)
            sql.push_str(
                "; INSERT INTO custody_streams (stream, category, version, updated_at) \
                 VALUES (?, ?, ?, ?) ON CONFLICT (stream) DO UPDATE SET \
                 version = excluded.version, updated_at = excluded.updated_at; \
                 RELEASE custody_append",
            );
        }
        sql
    })
}

/// Events matching `query` with a position above `after` (and at most
/// `upto`), in position order, at most `limit`.
///
/// When every item names a tag, the candidates come from the tag index;
/// otherwise the log is scanned from `after`.
async fn query_events(
    conn: &mut SqliteConnection,
    query: &Query,
    after: u64,
    upto: Option<u64>,
    limit: usize,
) -> Result<Vec<RecordedEvent>> {
    if query.items.is_empty() || limit == 0 {
        return Ok(Vec::new());
    }
    let mut sql = format!("SELECT {EVENT_COLUMNS} FROM custody_events AS e WHERE e.position > ?");
    let mut binds: Vec<String> = Vec::new();
    if upto.is_some() {
        sql.push_str(" AND e.position <= ?");
    }
    if query.items.iter().all(|i| !i.tags.is_empty()) {
        sql.push_str(" AND e.position IN (SELECT position FROM custody_event_tags WHERE position > ? AND tag IN (");
        for (n, item) in query.items.iter().enumerate() {
            sql.push_str(if n == 0 { "?" } else { ", ?" });
            binds.push(item.tags[0].clone());
        }
        sql.push_str("))");
    }
    sql.push_str(" AND (");
    for (n, item) in query.items.iter().enumerate() {
        if n > 0 {
            sql.push_str(" OR ");
        }
        sql.push_str("(1");
        if !item.types.is_empty() {
            sql.push_str(" AND e.event_type IN (");
            for (k, t) in item.types.iter().enumerate() {
                sql.push_str(if k == 0 { "?" } else { ", ?" });
                binds.push(t.clone());
            }
            sql.push(')');
        }
        for t in &item.tags {
            sql.push_str(
                " AND EXISTS (SELECT 1 FROM custody_event_tags AS t WHERE t.tag = ? AND t.position = e.position)",
            );
            binds.push(t.clone());
        }
        sql.push(')');
    }
    sql.push_str(") ORDER BY e.position LIMIT ?");
    let mut q = sqlx::query(&sql).bind(to_i64(after));
    if let Some(upto) = upto {
        q = q.bind(to_i64(upto));
    }
    if query.items.iter().all(|i| !i.tags.is_empty()) {
        q = q.bind(to_i64(after));
    }
    for b in &binds {
        q = q.bind(b.as_str());
    }
    let rows = q
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *conn)
        .await
        .map_err(map_err("read events by query"))?;
    rows.iter().map(decode_event).collect()
}

fn decode_event(row: &SqliteRow) -> Result<RecordedEvent> {
    const OP: &str = "decode stored event";
    fn get<T>(r: std::result::Result<T, sqlx::Error>) -> Result<T> {
        r.map_err(map_err(OP))
    }
    let position: i64 = get(row.try_get(0))?;
    let headers: Option<String> = get(row.try_get(8))?;
    let tags: Option<String> = get(row.try_get(9))?;
    let recorded: i64 = get(row.try_get(10))?;
    let schema_version: i64 = get(row.try_get(5))?;
    let bad = |what: String| {
        Error::store(
            BACKEND,
            OP,
            false,
            format!("event at position {position}: {what}; the custody_events row was changed outside custody"),
        )
    };
    Ok(RecordedEvent {
        position: to_u64(position),
        stream: get(row.try_get(1))?,
        version: to_u64(get(row.try_get::<i64, _>(2))?),
        id: get(row.try_get(3))?,
        event_type: get(row.try_get(4))?,
        schema_version: u32::try_from(schema_version)
            .map_err(|_| bad(format!("schema version {schema_version} out of range")))?,
        content_type: get(row.try_get(6))?,
        payload: get(row.try_get(7))?,
        headers: match headers {
            None => BTreeMap::new(),
            Some(h) => serde_json::from_str(&h)
                .map_err(|e| bad(format!("headers are not a JSON object of strings ({e})")))?,
        },
        tags: match tags {
            None => Vec::new(),
            Some(t) => serde_json::from_str(&t)
                .map_err(|e| bad(format!("tags are not a JSON array of strings ({e})")))?,
        },
        recorded_at: from_ms(recorded),
    })
}

fn from_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn limit_i64(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

type InfoRow = (
    String,
    i64,
    Option<i64>,
    Option<i64>,
    Option<String>,
    bool,
    i64,
);

fn decode_info(row: InfoRow) -> Result<StreamInfo> {
    let (stream, version, truncate_before, max_age_ms, custom, tombstoned, updated_at) = row;
    let custom = match custom {
        None => None,
        Some(c) => Some(serde_json::from_str(&c).map_err(|e| {
            Error::store(
                BACKEND,
                "read stream metadata",
                false,
                format!("stream {stream:?}: custom metadata is not JSON ({e}); the custody_streams row was changed outside custody"),
            )
        })?),
    };
    Ok(StreamInfo {
        stream,
        version: to_u64(version),
        metadata: StreamMetadata {
            truncate_before: truncate_before.map(to_u64),
            max_age: max_age_ms.map(|ms| Duration::from_millis(to_u64(ms))),
            custom,
        },
        tombstoned,
        updated_at: from_ms(updated_at),
    })
}

/// The smallest string greater than every string starting with `prefix`
/// (`None`: there is none), for a range scan of `custody_streams`. UTF-8
/// byte order is code point order, so incrementing the last code point
/// that can be incremented gives it.
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = u32::from(last) + 1;
        while next <= u32::from(char::MAX) {
            if let Some(c) = char::from_u32(next) {
                chars.push(c);
                return Some(chars.into_iter().collect());
            }
            next += 1;
        }
    }
    None
}

impl EventStore for SqliteEventStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendOutcome> {
        validate(stream, &events)?;
        self.write(Write::Append {
            stream: stream.to_owned(),
            expected,
            events,
        })
        .await
    }

    async fn append_if(
        &self,
        stream: &str,
        condition: &AppendCondition,
        events: Vec<EventData>,
    ) -> Result<AppendOutcome> {
        validate(stream, &events)?;
        self.write(Write::AppendIf {
            stream: stream.to_owned(),
            condition: condition.clone(),
            events,
        })
        .await
    }

    async fn read_stream(
        &self,
        stream: &str,
        direction: Direction,
        from: u64,
        limit: usize,
    ) -> Result<StreamRead> {
        const OP: &str = "read stream";
        validate_stream_name(stream)?;
        // One read transaction: the version and the events from one snapshot.
        let mut tx = self.pool.begin().await.map_err(map_err(OP))?;
        let info: Option<InfoRow> = sqlx::query_as(STREAM_INFO)
            .bind(stream)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        let Some(info) = info.map(decode_info).transpose()? else {
            tx.commit().await.map_err(map_err(OP))?;
            return Ok(StreamRead {
                events: Vec::new(),
                version: None,
                tombstoned: false,
            });
        };
        let floor = info.metadata.truncate_before.unwrap_or(0);
        let min_recorded = match info.metadata.max_age {
            Some(age) => self.now_ms().saturating_sub(duration_ms(age)),
            None => i64::MIN,
        };
        let sql = match direction {
            Direction::Forward => format!(
                "SELECT {EVENT_COLUMNS} FROM custody_events WHERE stream = ?1 AND version >= ?2 \
                 AND version >= ?3 AND recorded_at >= ?4 ORDER BY version LIMIT ?5"
            ),
            Direction::Backward => format!(
                "SELECT {EVENT_COLUMNS} FROM custody_events WHERE stream = ?1 AND version <= ?2 \
                 AND version >= ?3 AND recorded_at >= ?4 ORDER BY version DESC LIMIT ?5"
            ),
        };
        let rows = if limit == 0 {
            Vec::new()
        } else {
            sqlx::query(&sql)
                .bind(stream)
                .bind(to_i64(from))
                .bind(to_i64(floor))
                .bind(min_recorded)
                .bind(limit_i64(limit))
                .fetch_all(&mut *tx)
                .await
                .map_err(map_err(OP))?
        };
        tx.commit().await.map_err(map_err(OP))?;
        let events = rows.iter().map(decode_event).collect::<Result<Vec<_>>>()?;
        Ok(StreamRead {
            events,
            version: (info.version > 0).then_some(info.version),
            tombstoned: info.tombstoned,
        })
    }

    async fn read_all(&self, after: u64, filter: &LogFilter, limit: usize) -> Result<LogSlice> {
        const OP: &str = "read event log";
        let head = self.head_on().await?;
        if limit == 0 || after >= head {
            return Ok(LogSlice {
                events: Vec::new(),
                scanned_to: after.min(head),
                head,
            });
        }
        let filtered = !filter.categories.is_empty() || !filter.types.is_empty();
        let upto = if filtered {
            head.min(after.saturating_add(SCAN_WINDOW))
        } else {
            head
        };
        let mut sql = format!(
            "SELECT {EVENT_COLUMNS} FROM custody_events WHERE position > ?1 AND position <= ?2"
        );
        if filtered {
            // an empty list means "all" (LogFilter)
            sql.push_str(&format!(
                " AND (?4 = '[]' OR {CATEGORY_SQL} IN (SELECT value FROM json_each(?4))) \
                 AND (?5 = '[]' OR event_type IN (SELECT value FROM json_each(?5)))"
            ));
        }
        sql.push_str(" ORDER BY position LIMIT ?3");
        let categories = serde_json::to_string(&filter.categories).unwrap_or_default();
        let types = serde_json::to_string(&filter.types).unwrap_or_default();
        let mut q = sqlx::query(&sql)
            .bind(to_i64(after))
            .bind(to_i64(upto))
            .bind(limit_i64(limit));
        if filtered {
            q = q.bind(categories).bind(types);
        }
        let rows = q.fetch_all(&self.pool).await.map_err(map_err(OP))?;
        let events = rows.iter().map(decode_event).collect::<Result<Vec<_>>>()?;
        let scanned_to = match events.last() {
            Some(last) if events.len() == limit => last.position,
            _ => upto,
        };
        Ok(LogSlice {
            events,
            scanned_to,
            head,
        })
    }

    async fn read_query(&self, query: &Query, after: u64, limit: usize) -> Result<LogSlice> {
        const OP: &str = "read events by query";
        let head = self.head_on().await?;
        let mut conn = self.pool.acquire().await.map_err(map_err(OP))?;
        let events = query_events(&mut conn, query, after, Some(head), limit).await?;
        let scanned_to = match events.last() {
            Some(last) if events.len() == limit => last.position,
            _ => head,
        };
        Ok(LogSlice {
            events,
            scanned_to,
            head,
        })
    }

    async fn head(&self) -> Result<u64> {
        self.head_on().await
    }

    async fn wait_for_head(&self, after: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            // Registered before reading the head, so a commit between the
            // read and the wait still wakes us.
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let head = self.head_on().await?;
            let now = Instant::now();
            if head > after || now >= deadline {
                return Ok(head);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline.min(now + self.poll)) => {}
            }
        }
    }

    async fn stream_info(&self, stream: &str) -> Result<Option<StreamInfo>> {
        validate_stream_name(stream)?;
        let row: Option<InfoRow> = sqlx::query_as(STREAM_INFO)
            .bind(stream)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err("read stream info"))?;
        row.map(decode_info).transpose()
    }

    async fn set_metadata(&self, stream: &str, metadata: &StreamMetadata) -> Result<()> {
        validate_stream_name(stream)?;
        let custom = metadata
            .custom
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| {
                Error::InvalidMessage(format!("stream metadata does not serialize to JSON: {e}"))
            })?;
        sqlx::query(SET_METADATA)
            .bind(stream)
            .bind(category_of(stream))
            .bind(metadata.truncate_before.map(to_i64))
            .bind(metadata.max_age.map(duration_ms))
            .bind(custom)
            .bind(self.now_ms())
            .execute(&self.pool)
            .await
            .map_err(map_err("set stream metadata"))?;
        Ok(())
    }

    async fn delete_stream(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        mode: DeleteMode,
    ) -> Result<AppendOutcome> {
        const OP: &str = "delete stream";
        validate_stream_name(stream)?;
        // The write lock first: the version check and the update are one
        // step for every other writer.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err(OP))?;
        let state: Option<(i64, bool)> =
            sqlx::query_as("SELECT version, tombstoned FROM custody_streams WHERE stream = ?1")
                .bind(stream)
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_err(OP))?;
        if state.is_some_and(|(_, t)| t) {
            return Ok(AppendOutcome::Tombstoned);
        }
        let current = state.map_or(0, |(v, _)| to_u64(v));
        let actual = (current > 0).then_some(current);
        if !expected.matches(actual) {
            return Ok(AppendOutcome::WrongVersion { expected, actual });
        }
        if state.is_some() || mode == DeleteMode::Tombstone {
            sqlx::query(DELETE_STREAM)
                .bind(stream)
                .bind(category_of(stream))
                .bind(to_i64(current))
                .bind(mode == DeleteMode::Tombstone)
                .bind(self.now_ms())
                .execute(&mut *tx)
                .await
                .map_err(map_err(OP))?;
        }
        tx.commit().await.map_err(map_err(OP))?;
        Ok(AppendOutcome::Appended(Appended {
            first_version: current + 1,
            version: current,
            idempotent: false,
        }))
    }

    async fn streams(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StreamInfo>> {
        // A plain range on the primary key (no `?n IS NULL OR …`, which
        // SQLite cannot use as a bound): from the prefix or past `after`,
        // whichever is further, up to the first name after the prefix.
        let (lower_op, lower) = match after {
            Some(a) if a >= prefix => (">", a),
            _ => (">=", prefix),
        };
        let upper = prefix_end(prefix).filter(|_| !prefix.is_empty());
        let sql = format!(
            "SELECT stream, version, truncate_before, max_age_ms, metadata, tombstoned, updated_at \
             FROM custody_streams WHERE stream {lower_op} ?1{} ORDER BY stream LIMIT ?2",
            if upper.is_some() { " AND stream < ?3" } else { "" }
        );
        let mut q = sqlx::query_as::<_, InfoRow>(&sql)
            .bind(lower)
            .bind(limit_i64(limit));
        if let Some(upper) = upper {
            q = q.bind(upper);
        }
        let rows = q
            .fetch_all(&self.pool)
            .await
            .map_err(map_err("list streams"))?;
        rows.into_iter()
            .map(decode_info)
            .filter(|r| r.as_ref().map_or(true, |i| i.stream.starts_with(prefix)))
            .collect()
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        validate_stream_name(&snapshot.stream)?;
        if snapshot.aggregate.is_empty() {
            return Err(Error::InvalidMessage(format!(
                "snapshot of stream {:?} has an empty aggregate type; name the aggregate (e.g. \"Order\")",
                snapshot.stream
            )));
        }
        sqlx::query(SAVE_SNAPSHOT)
            .bind(&snapshot.stream)
            .bind(&snapshot.aggregate)
            .bind(i64::from(snapshot.schema_version))
            .bind(to_i64(snapshot.version))
            .bind(snapshot.state.as_slice())
            .bind(snapshot.taken_at.timestamp_millis())
            .execute(&self.pool)
            .await
            .map_err(map_err("save snapshot"))?;
        Ok(())
    }

    async fn load_snapshot(&self, stream: &str, aggregate: &str) -> Result<Option<Snapshot>> {
        let row: Option<(String, String, i64, i64, Vec<u8>, i64)> = sqlx::query_as(LOAD_SNAPSHOT)
            .bind(stream)
            .bind(aggregate)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err("load snapshot"))?;
        row.map(|(stream, aggregate, sv, version, state, taken)| {
            Ok(Snapshot {
                schema_version: u32::try_from(sv).map_err(|_| {
                    Error::store(
                        BACKEND,
                        "load snapshot",
                        false,
                        format!("snapshot of {stream:?}/{aggregate:?} has schema version {sv}, out of range; the row was changed outside custody"),
                    )
                })?,
                stream,
                aggregate,
                version: to_u64(version),
                state,
                taken_at: from_ms(taken),
            })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_bounds_the_prefix() {
        assert_eq!(prefix_end("order-").as_deref(), Some("order."));
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
        assert_eq!(prefix_end("\u{D7FF}").as_deref(), Some("\u{E000}"));
        let end = prefix_end("ab").unwrap_or_default();
        assert!("ab\u{10FFFF}zz" < end.as_str() && "ac" >= end.as_str());
    }
}
