//! Appending: one transaction writes one or several appends (a combined
//! batch) with one statement for all their events.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use custody_core::event::{category_of, AppendOutcome, Appended, EventData, ExpectedVersion};
use custody_core::Error;
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::dcb::{self, Buckets};
use crate::error::map_err;

/// The NOTIFY channel appends signal on; readers waiting for the head
/// LISTEN on it and run the sequencer when woken.
pub(crate) const CHANNEL: &str = "custody_events";

/// One append request.
#[derive(Debug)]
pub(crate) struct Item {
    pub(crate) stream: String,
    pub(crate) expected: ExpectedVersion,
    pub(crate) events: Vec<EventData>,
}

/// How stream rows are locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Locking {
    /// Wait for a stream row another transaction holds.
    Wait,
    /// Skip it: that append is returned as deferred (the combiner never
    /// waits on one stream's holder while other appends queue behind).
    Skip,
}

/// When event ids are looked up before writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// Only for an append whose expected version does not match (is it a
    /// retry of one already written?). An id already used elsewhere then
    /// surfaces as a unique violation, and the caller retries with `Always`.
    OnMismatch,
    /// For every append (a unique violation aborts a transaction, so a
    /// caller's transaction, or a retry after one, looks first).
    Always,
}

/// Lock the stream rows, waiting for holders. New streams get a row at
/// version 0 (rolled back with a refused append). `ON CONFLICT DO UPDATE`
/// locks an existing row and returns its latest committed version (READ
/// COMMITTED re-reads the row after waiting for its holder), in one round
/// trip; the no-op SET keeps the update HOT. Rows are taken in stream
/// order, so combined appends cannot deadlock each other. `xmax = 0` tells
/// an inserted row from an existing one (a row locked by ON CONFLICT DO
/// UPDATE carries this transaction's xid in xmax).
///
/// The same statement first takes the append condition's shared bucket
/// locks (class `$3`, buckets `$4`, modes `$5`; empty arrays take none), a
/// round trip less per transaction than a statement of their own. They
/// must be held before any stream row is locked (dcb module: that order is
/// what keeps them from deadlocking): the lock subquery is uncorrelated,
/// so PostgreSQL runs it as an InitPlan of the WHERE's one-time filter,
/// which gates the scan of the stream names: no row reaches the INSERT
/// (and no row lock is taken) before every bucket lock is granted.
const LOCK_STREAMS_WAIT: &str = "\
INSERT INTO custody_streams AS cs (stream, category)
SELECT s, c FROM unnest($1::text[], $2::text[]) AS u(s, c)
WHERE (SELECT count(CASE WHEN x THEN pg_advisory_xact_lock($3, k)
                         ELSE pg_advisory_xact_lock_shared($3, k) END)
       FROM unnest($4::int4[], $5::bool[]) WITH ORDINALITY AS l(k, x, i)) >= 0
ORDER BY s
ON CONFLICT (stream) DO UPDATE SET updated_at = cs.updated_at
RETURNING stream, version, tombstoned, xmax = 0 AS inserted";

/// Lock the stream rows, skipping rows another transaction holds. New
/// streams are inserted (and so held by this transaction); the subquery's
/// snapshot does not see them, so they come back once. FOR UPDATE returns
/// the latest committed version of a row changed since the snapshot.
///
/// Bucket locks first, as in [`LOCK_STREAMS_WAIT`]: `l` is evaluated once,
/// by whichever branch runs first, and both branches are gated on it (a
/// one-time filter), so neither locks a stream row before the buckets.
const LOCK_STREAMS_SKIP: &str = "\
WITH l AS MATERIALIZED (
    SELECT count(CASE WHEN x THEN pg_advisory_xact_lock($3, k)
                      ELSE pg_advisory_xact_lock_shared($3, k) END) AS n
    FROM unnest($4::int4[], $5::bool[]) WITH ORDINALITY AS b(k, x, i)
), ins AS (
    INSERT INTO custody_streams (stream, category)
    SELECT s, c FROM unnest($1::text[], $2::text[]) AS u(s, c)
    WHERE (SELECT n FROM l) >= 0
    ORDER BY s
    ON CONFLICT (stream) DO NOTHING
    RETURNING stream, version, tombstoned
)
SELECT stream, version, tombstoned, true AS inserted FROM ins
UNION ALL
SELECT * FROM (
    SELECT stream, version, tombstoned, false FROM custody_streams
    WHERE stream = ANY($1::text[]) AND (SELECT n FROM l) >= 0
    ORDER BY stream FOR UPDATE SKIP LOCKED
) held";

/// Remove the rows of new streams no append was written to (refused, or
/// an error): they were inserted by this transaction to be locked. Only
/// rows still as inserted (version 0, no metadata, not tombstoned), so a
/// row that holds anything is kept whatever `inserted` said.
const DROP_UNUSED: &str = "DELETE FROM custody_streams WHERE stream = ANY($1::text[]) \
     AND version = 0 AND metadata = '{}'::jsonb AND NOT tombstoned";

/// Where the given ids are already stored.
const PROBE_IDS: &str = "SELECT id, stream, version FROM custody_events WHERE id = ANY($1::uuid[])";

/// Write a batch: take a tx number (after the stream locks: see the
/// sequencer's per-stream order argument), insert every event with one
/// statement, the pending row, the stream versions, and NOTIFY at commit.
/// `t` is materialized once (it is referenced several times and volatile).
const WRITE: &str = "\
WITH t AS (SELECT nextval('custody_event_tx') AS tx),
ev AS (
    INSERT INTO custody_events (tx, ordinal, stream, version, id, event_type, schema_version,
                                content_type, payload, headers, tags, recorded_at)
    SELECT t.tx, u.o, u.s, u.v, u.id, u.ty, u.sv, u.ct, u.p, u.h,
           CASE WHEN u.g = '[]' THEN '{}'::text[]
                ELSE ARRAY(SELECT jsonb_array_elements_text(u.g::jsonb)) END,
           now()
    FROM t, unnest($1::int4[], $2::text[], $3::int8[], $4::uuid[], $5::text[], $6::int4[],
                   $7::text[], $8::bytea[], $9::text[], $10::text[])
         AS u(o, s, v, id, ty, sv, ct, p, h, g)
), p AS (
    INSERT INTO custody_event_pending (tx, n) SELECT tx, $11 FROM t
), st AS (
    UPDATE custody_streams cs SET version = u.v, updated_at = now()
    FROM unnest($12::text[], $13::int8[]) AS u(s, v) WHERE cs.stream = u.s
)
SELECT t.tx FROM t, (SELECT pg_notify('custody_events', '')) n";

/// The outcome of one item of a batch.
pub(crate) enum ItemResult {
    /// Decided (written, refused, or an error about this append only).
    Done(custody_core::Result<AppendOutcome>),
    /// Its stream row was held by another transaction ([`Locking::Skip`]).
    Deferred,
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The actual version as the outcomes report it (`None`: no stream).
fn actual(version: u64) -> Option<u64> {
    (version > 0).then_some(version)
}

/// Decide an append whose ids are (partly) stored already: idempotent when
/// every id is in this stream at consecutive versions the append would have
/// given them, an error when one is in another stream, else a conflict.
fn classify(
    item: &Item,
    current: u64,
    found: &HashMap<Uuid, (String, u64)>,
) -> Option<custody_core::Result<AppendOutcome>> {
    let places: Vec<Option<&(String, u64)>> =
        item.events.iter().map(|e| found.get(&e.id)).collect();
    if places.iter().all(Option::is_none) {
        return None;
    }
    if let Some((e, (other, _))) = item
        .events
        .iter()
        .zip(&places)
        .find_map(|(e, p)| p.filter(|(s, _)| *s != item.stream).map(|p| (e, p)))
    {
        return Some(Err(Error::InvalidMessage(format!(
            "event id {} is already used by an event of stream {other:?}; event ids are message ids \
             and unique in the store: give the event a fresh id (EventData::new makes one)",
            e.id
        ))));
    }
    let first = places.first().copied().flatten().map(|(_, v)| *v);
    let consecutive = first.is_some_and(|v0| {
        places
            .iter()
            .enumerate()
            .all(|(i, p)| p.is_some_and(|(_, v)| *v == v0 + i as u64))
    });
    match first {
        Some(v0) if consecutive && item.expected.matches(actual(v0 - 1)) => {
            Some(Ok(AppendOutcome::Appended(Appended {
                first_version: v0,
                version: v0 + item.events.len() as u64 - 1,
                idempotent: true,
            })))
        }
        _ => Some(Ok(AppendOutcome::WrongVersion {
            expected: item.expected,
            actual: actual(current),
        })),
    }
}

/// Columns of the events to insert.
#[derive(Default)]
struct Columns {
    ordinal: Vec<i32>,
    stream: Vec<String>,
    version: Vec<i64>,
    id: Vec<Uuid>,
    event_type: Vec<String>,
    schema_version: Vec<i32>,
    content_type: Vec<String>,
    payload: Vec<Vec<u8>>,
    headers: Vec<String>,
    tags: Vec<String>,
}

impl Columns {
    fn push(&mut self, stream: &str, version: u64, e: &EventData) -> custody_core::Result<()> {
        let ordinal = i32::try_from(self.ordinal.len()).map_err(|_| {
            Error::InvalidMessage("one append may hold at most 2^31 events; split it".into())
        })?;
        let json = |what: &str, r: serde_json::Result<String>| {
            r.map_err(|err| {
                Error::InvalidMessage(format!("event {}: cannot encode its {what}: {err}", e.id))
            })
        };
        self.ordinal.push(ordinal);
        self.stream.push(stream.to_owned());
        self.version.push(i64_of(version));
        self.id.push(e.id);
        self.event_type.push(e.event_type.clone());
        self.schema_version
            .push(i32::try_from(e.schema_version).unwrap_or(i32::MAX));
        self.content_type.push(e.content_type.clone());
        self.payload.push(e.payload.clone());
        self.headers
            .push(json("headers", serde_json::to_string(&e.headers))?);
        self.tags
            .push(json("tags", serde_json::to_string(&e.tags))?);
        Ok(())
    }
}

/// Write `items` in the transaction open on `conn`; the caller commits (or
/// rolls back on an error). `buckets`: whether to take the shared append
/// condition locks (false when the caller took them).
///
/// Each item is checked on its own against the running version of its
/// stream (earlier items of the batch included), so a conflict in one does
/// not fail the others. A database error fails the whole batch.
pub(crate) async fn write(
    conn: &mut PgConnection,
    items: &[Item],
    locking: Locking,
    probe: Probe,
    buckets: bool,
) -> Result<Vec<ItemResult>, sqlx::Error> {
    // the bucket locks go with the stream locks, in one statement
    let mut b = Buckets::default();
    if buckets {
        for item in items {
            b.write(&item.events);
        }
    }
    let (keys, exclusive) = b.arrays();
    let streams: BTreeSet<&str> = items.iter().map(|i| i.stream.as_str()).collect();
    let categories: Vec<&str> = streams.iter().map(|s| category_of(s)).collect();
    let names: Vec<&str> = streams.into_iter().collect();
    let sql = match locking {
        Locking::Wait => LOCK_STREAMS_WAIT,
        Locking::Skip => LOCK_STREAMS_SKIP,
    };
    let rows = sqlx::query(sql)
        .bind(&names)
        .bind(&categories)
        .bind(dcb::LOCK_CLASS)
        .bind(keys)
        .bind(exclusive)
        .fetch_all(&mut *conn)
        .await?;
    // stream -> (version, tombstoned), for the streams this transaction holds
    let mut held: HashMap<String, (u64, bool)> = HashMap::new();
    let mut inserted: BTreeSet<String> = BTreeSet::new();
    for row in rows {
        if row.try_get("inserted")? {
            inserted.insert(row.try_get("stream")?);
        }
        held.insert(
            row.try_get("stream")?,
            (u64_of(row.try_get("version")?), row.try_get("tombstoned")?),
        );
    }

    let mut found: HashMap<Uuid, (String, u64)> = HashMap::new();
    if probe == Probe::Always {
        let ids: Vec<Uuid> = items
            .iter()
            .flat_map(|i| i.events.iter().map(|e| e.id))
            .collect();
        probe_ids(conn, &ids, &mut found).await?;
    }

    // Decide each item against the running versions.
    enum Plan {
        Done(custody_core::Result<AppendOutcome>),
        Deferred,
        Write { first: u64 },
        Mismatch { current: u64 },
    }
    let mut plans = Vec::with_capacity(items.len());
    let mut running = held.clone();
    for item in items {
        let Some((version, tombstoned)) = running.get_mut(&item.stream) else {
            plans.push(Plan::Deferred);
            continue;
        };
        if *tombstoned {
            plans.push(Plan::Done(Ok(AppendOutcome::Tombstoned)));
            continue;
        }
        if probe == Probe::Always {
            if let Some(outcome) = classify(item, *version, &found) {
                plans.push(Plan::Done(outcome));
                continue;
            }
        }
        if item.expected.matches(actual(*version)) {
            let first = *version + 1;
            *version += item.events.len() as u64;
            plans.push(Plan::Write { first });
        } else {
            plans.push(Plan::Mismatch { current: *version });
        }
    }

    // A mismatch may be a retry of an append already written.
    let mismatched: Vec<Uuid> = items
        .iter()
        .zip(&plans)
        .filter(|(_, p)| matches!(p, Plan::Mismatch { .. }))
        .flat_map(|(i, _)| i.events.iter().map(|e| e.id))
        .collect();
    if !mismatched.is_empty() && probe == Probe::OnMismatch {
        probe_ids(conn, &mismatched, &mut found).await?;
    }
    // ... including one written earlier in this batch
    let mut in_batch = found.clone();
    for (item, plan) in items.iter().zip(&plans) {
        if let Plan::Write { first } = plan {
            for (i, e) in item.events.iter().enumerate() {
                in_batch.insert(e.id, (item.stream.clone(), first + i as u64));
            }
        }
    }

    let mut columns = Columns::default();
    let mut versions: HashMap<&str, u64> = HashMap::new();
    let mut results = Vec::with_capacity(items.len());
    for (item, plan) in items.iter().zip(plans) {
        results.push(match plan {
            Plan::Done(outcome) => ItemResult::Done(outcome),
            Plan::Deferred => ItemResult::Deferred,
            Plan::Mismatch { current } => ItemResult::Done(
                classify(item, current, &in_batch).unwrap_or(Ok(AppendOutcome::WrongVersion {
                    expected: item.expected,
                    actual: actual(current),
                })),
            ),
            Plan::Write { first } => {
                let mut pushed = Ok(());
                for (i, e) in item.events.iter().enumerate() {
                    pushed = pushed.and_then(|()| columns.push(&item.stream, first + i as u64, e));
                }
                match pushed {
                    Ok(()) => {
                        let last = first + item.events.len() as u64 - 1;
                        if !item.events.is_empty() {
                            versions.insert(&item.stream, last);
                        }
                        ItemResult::Done(Ok(AppendOutcome::Appended(Appended {
                            first_version: first,
                            version: last,
                            idempotent: false,
                        })))
                    }
                    // cannot happen for validated events; refuse the whole
                    // batch rather than write a hole into a stream
                    Err(e) => return Err(sqlx::Error::Encode(Box::new(e))),
                }
            }
        });
    }
    let unused: Vec<&String> = inserted
        .iter()
        .filter(|s| !versions.contains_key(s.as_str()))
        .collect();
    if !unused.is_empty() {
        sqlx::query(DROP_UNUSED)
            .bind(unused)
            .execute(&mut *conn)
            .await?;
    }
    if !columns.ordinal.is_empty() {
        let n = i32::try_from(columns.ordinal.len()).unwrap_or(i32::MAX);
        let (vs, vv): (Vec<&str>, Vec<i64>) =
            versions.iter().map(|(s, v)| (*s, i64_of(*v))).unzip();
        sqlx::query(WRITE)
            .bind(columns.ordinal)
            .bind(columns.stream)
            .bind(columns.version)
            .bind(columns.id)
            .bind(columns.event_type)
            .bind(columns.schema_version)
            .bind(columns.content_type)
            .bind(columns.payload)
            .bind(columns.headers)
            .bind(columns.tags)
            .bind(n)
            .bind(vs)
            .bind(vv)
            .execute(&mut *conn)
            .await?;
    }
    Ok(results)
}

async fn probe_ids(
    conn: &mut PgConnection,
    ids: &[Uuid],
    found: &mut HashMap<Uuid, (String, u64)>,
) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    for row in sqlx::query(PROBE_IDS)
        .bind(ids)
        .fetch_all(&mut *conn)
        .await?
    {
        found.insert(
            row.try_get("id")?,
            (row.try_get("stream")?, u64_of(row.try_get("version")?)),
        );
    }
    Ok(())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Run `items` in one transaction of their own; an error rolls it back.
async fn transaction(
    pool: &PgPool,
    items: &[Item],
    locking: Locking,
    probe: Probe,
) -> Result<Vec<ItemResult>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let results = write(&mut tx, items, locking, probe, true).await?;
    tx.commit().await?;
    Ok(results)
}

/// One append in its own transaction, waiting for its stream's holder. An
/// id already stored somewhere makes the insert fail with a unique
/// violation; the append is then decided again looking the ids up first.
pub(crate) async fn append_alone(
    pool: &PgPool,
    item: &Item,
) -> custody_core::Result<AppendOutcome> {
    const OP: &str = "append events";
    let items = std::slice::from_ref(item);
    let results = match transaction(pool, items, Locking::Wait, Probe::OnMismatch).await {
        Err(e) if is_unique_violation(&e) => transaction(pool, items, Locking::Wait, Probe::Always)
            .await
            .map_err(|e| map_err(OP, e))?,
        other => other.map_err(|e| map_err(OP, e))?,
    };
    match results.into_iter().next() {
        Some(ItemResult::Done(outcome)) => outcome,
        // Locking::Wait never defers
        _ => Err(Error::store(
            "postgres",
            OP,
            true,
            "the stream row was not locked; retry the append",
        )),
    }
}

/// Counters of the write path ([`super::PgEventStore::write_stats`]).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) transactions: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) largest: AtomicU64,
    pub(crate) running: AtomicU64,
}

impl Counters {
    /// A transaction decided `writes` appends.
    pub(crate) fn committed(&self, writes: u64) {
        self.transactions.fetch_add(1, Ordering::Relaxed);
        self.writes.fetch_add(writes, Ordering::Relaxed);
        self.largest.fetch_max(writes, Ordering::Relaxed);
    }

    /// `n` appends are in a transaction now (`Running` counts them down
    /// when dropped).
    pub(crate) fn running(&self, n: u64) -> Running<'_> {
        self.running.fetch_add(n, Ordering::Relaxed);
        Running(self, n)
    }
}

/// Appends in a running transaction, until dropped.
pub(crate) struct Running<'a>(&'a Counters, u64);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// A queued append and where its outcome goes.
pub(crate) struct Request {
    pub(crate) item: Item,
    pub(crate) reply: oneshot::Sender<custody_core::Result<AppendOutcome>>,
}

/// Appends one combined transaction takes at most.
const MAX_BATCH: usize = 512;
/// Events one combined transaction takes at most (a larger single append
/// still goes alone).
const MAX_BATCH_EVENTS: usize = 10_000;
/// Appends queued for the combiner at most; a caller beyond waits.
pub(crate) const QUEUE: usize = 1024;

/// Combiner tasks per store: while one commits, the other gathers the
/// appends that arrived meanwhile and writes them (one task alone would
/// alternate a batch of one, taken the moment the previous batch's callers
/// were answered, with a batch of the rest).
pub(crate) const COMBINERS: usize = 2;

/// A combiner task: takes whatever appends are queued when it is free and
/// writes them in one transaction (one commit, one WAL flush). An append
/// alone is written at once (no added latency); while a transaction runs,
/// the next appends queue and go together. Ends when every sender (every
/// handle of the store) is dropped.
pub(crate) async fn combine(
    pool: PgPool,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Request>>>,
    counters: Arc<Counters>,
) {
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut events = first.item.events.len();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH && events < MAX_BATCH_EVENTS {
                match rx.try_recv() {
                    Ok(r) => {
                        events += r.item.events.len();
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            batch
        };
        run_batch(&pool, batch, &counters).await;
    }
}

async fn run_batch(pool: &PgPool, batch: Vec<Request>, counters: &Arc<Counters>) {
    let (items, replies): (Vec<Item>, Vec<_>) =
        batch.into_iter().map(|r| (r.item, r.reply)).unzip();
    let running = counters.running(items.len() as u64);
    let done = transaction(pool, &items, Locking::Skip, Probe::OnMismatch).await;
    drop(running);
    match done {
        Ok(results) => {
            let decided = results
                .iter()
                .filter(|r| matches!(r, ItemResult::Done(_)))
                .count() as u64;
            counters.committed(decided);
            for ((item, reply), result) in items.into_iter().zip(replies).zip(results) {
                match result {
                    ItemResult::Done(outcome) => {
                        let _ = reply.send(outcome);
                    }
                    // its stream is held (a long append_in, a slow
                    // appender): wait for it off the combiner's path
                    ItemResult::Deferred => alone(pool, item, reply, counters),
                }
            }
        }
        // Some append of the batch made it fail (an id stored already, a
        // value PostgreSQL refuses): the transaction rolled back, so run
        // each on its own and give each its own outcome or error.
        Err(e) => {
            tracing::debug!(error = %e, appends = items.len(), "custody: combined append failed; appending one by one");
            for (item, reply) in items.into_iter().zip(replies) {
                alone(pool, item, reply, counters);
            }
        }
    }
}

fn alone(
    pool: &PgPool,
    item: Item,
    reply: oneshot::Sender<custody_core::Result<AppendOutcome>>,
    counters: &Arc<Counters>,
) {
    let pool = pool.clone();
    let counters = counters.clone();
    tokio::spawn(async move {
        let running = counters.running(1);
        let outcome = append_alone(&pool, &item).await;
        drop(running);
        counters.committed(1);
        let _ = reply.send(outcome);
    });
}
