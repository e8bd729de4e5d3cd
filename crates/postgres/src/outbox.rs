//! The transactional outbox: enqueue in the caller's transaction, and the
//! relay's side (leases, batches, outcomes).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use custody_core::sequence::{SKIPPED_HEADER, SKIP_TYPE};
use custody_core::{
    keep_numbered, partition_for, plan_leases, Error, Message, OutboxRecord, OutboxStore,
    PublishAck, Result, RowWrite,
};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::error::db;
use crate::row::{outbox_columns, OutboxRow};
use crate::wake::{Waiter, Wake};

/// Partitions keys are hashed into unless [`PgOutbox::with_partitions`] says otherwise.
pub const DEFAULT_PARTITIONS: u32 = 16;

/// How often, at most, enqueues through one [`PgOutbox`] (and its clones)
/// send NOTIFY, unless [`PgOutbox::with_notify_interval`] says otherwise
/// (zero: every enqueue notifies). A committing transaction that notified
/// takes a cluster-wide lock, so NOTIFY from every enqueue serializes the
/// producers' commits; a relay that found messages within its
/// `poll-interval` polls every `busy-poll-interval` and needs no NOTIFY, and
/// an idle one is woken by the first enqueue after a quiet interval. In
/// `custody bench outbox` 20 ms against zero gave 0.52–0.55 against
/// 0.24–0.31 of ceiling (a) end to end, at the same p99 under load
/// (docs/BENCHMARKS.md). The cost: a message enqueued within the interval
/// after one whose transaction is still open (or rolled back) while the relay
/// is idle waits for that commit or the relay's `poll-interval`.
pub const DEFAULT_NOTIFY_INTERVAL: Duration = Duration::from_millis(20);

/// The PostgreSQL outbox. Cheap to clone; clones share the pool and the
/// LISTEN connection used by [`OutboxStore::wait_for_new`].
#[derive(Clone)]
pub struct PgOutbox {
    pool: PgPool,
    partitions: u32,
    notify: bool,
    gate: Arc<NotifyGate>,
    waiter: Waiter,
    producer: std::sync::Arc<tokio::sync::OnceCell<String>>,
    /// Numberings since the last sweep of the sequence journal.
    numberings: Arc<AtomicU64>,
    /// Whether enqueue takes the key's advisory lock (see [`PgOutbox::with_key_locks`]).
    key_locks: bool,
    /// This process's relay instance token (see [`PgOutbox::with_instance`]).
    instance: Arc<str>,
}

/// Which enqueue sends the next NOTIFY: the first one at least `every` after
/// the last that did. Shared by the clones of a [`PgOutbox`].
///
/// A transaction that issued NOTIFY takes a cluster-wide lock at commit and
/// holds it through its WAL flush, so notifying commits cannot share a flush
/// (group commit): with a NOTIFY in every producer transaction, producers
/// commit one fsync at a time (measured: half the commit rate with 8
/// producers). A relay only needs waking when it sleeps; while traffic flows
/// it polls every `busy-poll-interval` (RelayConfig), so one NOTIFY per
/// interval is enough to wake an idle relay at the first message after a
/// quiet spell. If the transaction that carried the NOTIFY rolls back, the
/// next notifying enqueue (or the relay's `poll-interval`) wakes it.
#[derive(Debug)]
struct NotifyGate {
    every: Duration,
    origin: Instant,
    /// Microseconds after `origin` of the last NOTIFY, plus one (0: never).
    last: AtomicU64,
}

impl NotifyGate {
    fn new(every: Duration) -> Arc<Self> {
        Arc::new(NotifyGate {
            every,
            origin: Instant::now(),
            last: AtomicU64::new(0),
        })
    }

    /// Whether this enqueue sends NOTIFY; of several at the same moment, one does.
    fn take(&self) -> bool {
        if self.every.is_zero() {
            return true;
        }
        let now = u64::try_from(self.origin.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.last.load(Ordering::Acquire);
        let every = u64::try_from(self.every.as_micros()).unwrap_or(u64::MAX);
        if last != 0 && now.saturating_sub(last) < every {
            return false;
        }
        self.last
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

impl std::fmt::Debug for PgOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOutbox")
            .field("partitions", &self.partitions)
            .field("notify", &self.notify)
            .field("notify_interval", &self.gate.every)
            .field("key_locks", &self.key_locks)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

// The insert statements are macros so that `notifying!` can wrap them at
// compile time. `$locks` is the FROM item that takes the key locks (see
// KEY_LOCK_NAMESPACE), or a one-row nothing without them.
macro_rules! insert_one {
    ($locks:expr) => {
        concat!(
            "INSERT INTO custody_outbox
    (id, kind, topic, msg_key, partition, message_type, content_type, headers, payload, created_at)
SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 FROM ",
            $locks,
            "
RETURNING position"
        )
    };
}

// Scenario "per-key order" (docs/SEQUENCES.md, "Order per key"): the
// transaction-scoped advisory lock on the key is taken *before* the row gets
// its position. The position (an identity default) is computed when the
// INSERT projects its row, which is after the FROM item `l` has produced its
// one row, i.e. after pg_advisory_xact_lock returned (a volatile function is
// never folded or evaluated late). The lock is held to the end of the
// transaction and released only after the commit is visible to every new
// snapshot, so a second transaction on the same key gets its position after
// the first committed, and position order is commit order per key.

// One statement for the whole batch. WITH ORDINALITY + ORDER BY keeps the
// identity values in input order (a subquery with ORDER BY is not pulled up,
// so the rows reach the insert sorted), which keeps a batch's messages of one
// key in order. `$locks` is joined in: the join emits no row before the
// aggregate over every lock has finished, so every key is locked before the
// first position is taken. The lock keys ($11) come sorted and distinct, and
// unnest reads them in array order: two batches lock their common keys in
// the same order and cannot deadlock each other.
macro_rules! insert_batch {
    ($locks:expr) => {
        concat!(
            "INSERT INTO custody_outbox
    (id, kind, topic, msg_key, partition, message_type, content_type, headers, payload, created_at)
SELECT id, kind, topic, msg_key, partition, message_type, content_type, headers, payload, created_at
FROM (
    SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[],
                         $7::text[], $8::text[], $9::bytea[], $10::timestamptz[])
        WITH ORDINALITY AS t(id, kind, topic, msg_key, partition, message_type, content_type,
                             headers, payload, created_at, ord)
    ORDER BY ord
) AS s CROSS JOIN ",
            $locks,
            "
RETURNING id, position"
        )
    };
}

// `$insert` and, in the same statement (one round trip), NOTIFY. NOTIFY is
// transactional: delivered at commit, never for a rollback. The data-modifying
// CTE always runs to completion; the volatile CTE `n` is never inlined, so
// pg_notify runs once per statement however many rows the batch has. Note
// that a transaction that has issued NOTIFY takes a global lock at commit
// (serializing committing notifiers): enqueue uses these only when the
// NotifyGate lets it (once per notify interval), the plain inserts otherwise.
macro_rules! notifying {
    ($insert:expr, $returning:literal) => {
        concat!(
            "WITH ins AS (\n",
            $insert,
            "\n), n AS (SELECT pg_notify('custody_outbox', ''))\nSELECT ",
            $returning,
            " FROM ins CROSS JOIN n"
        )
    };
}

// The sequence journal (custody_sequence_block, migration 0006): numbers
// given to rows that do not carry them yet. Entries `(id, pos, seq)` of the
// blocks of the leased partitions (a CTE `lease`) that overlap positions
// $lo..=$hi; the index on (partition, last_pos) keeps this to the blocks of
// the batches in flight however many are left behind.
macro_rules! journal_entries {
    ($lo:literal, $hi:literal) => {
        concat!(
            "SELECT b.id, u.pos, u.seq FROM custody_sequence_block b
    CROSS JOIN LATERAL unnest(b.positions, b.seqs) AS u(pos, seq)
    WHERE b.partition IN (SELECT partition FROM lease)
      AND b.last_pos >= ",
            $lo,
            " AND b.first_pos <= ",
            $hi
        )
    };
}

// The journal's number for outbox row `o` (a scalar subquery; NULL if none).
macro_rules! journal_number {
    () => {
        "SELECT b.seqs[array_position(b.positions, o.position)]
    FROM custody_sequence_block b
    WHERE b.partition = o.partition AND b.last_pos >= o.position
      AND b.first_pos <= o.position AND o.position = ANY(b.positions)
    LIMIT 1"
    };
}
pub(crate) use journal_number;

macro_rules! lock_one {
    () => {
        "(SELECT pg_advisory_xact_lock($11, $12)) AS l"
    };
}
macro_rules! lock_batch {
    () => {
        "(SELECT count(pg_advisory_xact_lock($11, k)) FROM unnest($12::int[]) AS k) AS l"
    };
}
macro_rules! no_lock {
    () => {
        "(SELECT 1) AS l"
    };
}

/// The insert statements: `[key locks][notify]`.
const INSERT_ONE: [[&str; 2]; 2] = [
    [
        insert_one!(no_lock!()),
        notifying!(insert_one!(no_lock!()), "ins.position"),
    ],
    [
        insert_one!(lock_one!()),
        notifying!(insert_one!(lock_one!()), "ins.position"),
    ],
];
const INSERT_BATCH: [[&str; 2]; 2] = [
    [
        insert_batch!(no_lock!()),
        notifying!(insert_batch!(no_lock!()), "ins.id, ins.position"),
    ],
    [
        insert_batch!(lock_batch!()),
        notifying!(insert_batch!(lock_batch!()), "ins.id, ins.position"),
    ],
];

/// The first key of custody's two-key advisory locks (`pg_advisory_xact_lock(int, int)`),
/// ASCII "cust": the second key is the FNV-1a hash of the message key
/// ([`key_lock`]). Applications that take two-key advisory locks should
/// not use this first key. Two message keys with the same hash share a lock:
/// that only serializes their producers a little more.
pub const KEY_LOCK_NAMESPACE: i32 = 0x6375_7374;

/// The second advisory lock key of message key `key`: its FNV-1a 32-bit
/// hash (the hash of [`partition_for`]), as PostgreSQL's `int`.
fn key_lock(key: &str) -> i32 {
    const OFFSET: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    let mut hash = OFFSET;
    for b in key.as_bytes() {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(PRIME);
    }
    i32::from_ne_bytes(hash.to_ne_bytes())
}

// Invariant 5 (no skipped commits). `position` is assigned at insert, not at
// commit, so a transaction that began earlier can commit a lower position
// after a higher one became visible. The relay cannot skip it: it reads
// pending rows by status, not past a cursor, so a row that commits late is
// simply pending on a later call. It therefore takes no visibility guard
// (the embedded reader, a cursor, needs `txid < pg_snapshot_xmin(...)`): that
// xmin is cluster-wide, and waiting for it made the relay wait for every
// transaction in flight in any database of the cluster (the consumer's own,
// a long batch job's), which was most of the relay's latency in `custody
// bench outbox` (docs/BENCHMARKS.md).
//
// Order per key: enqueue serializes the transactions of one key from their
// insert to their commit (the key's advisory lock, see insert_one!), so
// among a key's rows position order is commit order, and a row becomes
// visible only after every lower-positioned row of its key did. Reading in
// position order therefore publishes each key in commit order however the
// relay's reads interleave with the commits.
//
// A failing message holds back its own key and no other: the NOT EXISTS
// (served by the partial index custody_outbox_parked) leaves out a row when
// any other pending row of the same key is parked until after $3, whatever
// its position, so nothing of the key overtakes the parked message (rows
// written before the key locks existed, or by a producer that does not take
// them, can sit below it).
// `$extra`: further conditions on `o`.
macro_rules! fetch_pending {
    ($extra:literal) => {
        concat!(
            "SELECT ",
            outbox_columns!(),
            ", o.republish, o.seq
FROM custody_outbox o
WHERE o.status = 0
  AND o.partition = ANY($1)
",
            $extra,
            "  AND NOT EXISTS (
      SELECT 1 FROM custody_outbox p
      WHERE p.status = 0 AND p.retry_at IS NOT NULL
        AND p.partition = o.partition AND p.msg_key = o.msg_key
        AND p.retry_at > $3)
ORDER BY o.position
LIMIT $2"
        )
    };
}

const FETCH_BATCH: &str = fetch_pending!("");

// FETCH_BATCH without the rows at positions $4 (OutboxStore::fetch_batch_excluding):
// the pipelined relay's in-flight batches, still pending, are neither
// returned nor decoded again.
const FETCH_BATCH_EXCLUDING: &str = fetch_pending!("  AND o.position <> ALL($4)\n");

// Fencing: only rows of partitions `relay` still holds an unexpired lease on.
// $2/$4: positions and their acks' references, zipped by UNNEST.
//
// Committed without waiting for the WAL flush (`cfg`: SET LOCAL
// synchronous_commit = off for this statement's own transaction, read at
// its commit; the condition on `cfg.s` makes every updated row depend on
// it, so it has run before anything is written). A mark lost in a server
// crash only puts the messages back to pending: they are published again,
// which the transport's duplicate window and every consumer's inbox (by
// message id) already absorb, and the first delivery of each message kept
// its place in its key's order. The relay saves a flush wait per batch and
// the WAL writer flushes the mark together with other commits.
//
// Each row's number moves from the sequence journal into the row version the
// mark writes anyway (a scalar subquery per row: a join against the unnested
// journal was planned as a nested loop, 42 ms per 500 rows), and the journal
// rows of the batch ($5..$6) whose every entry was marked here are deleted in
// the same transaction (a lost mark brings them back with it). Journal rows
// not wholly marked (a failure, a lease lost) stay for the next numbering
// and the sweep.
const MARK_PUBLISHED: &str = concat!(
    "\
WITH cfg AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true) AS s),
lease AS (SELECT partition FROM custody_relay_lease WHERE owner = $1 AND expires_at > $3),
upd AS (
    UPDATE custody_outbox o
    SET status = 1, published_at = $3, publish_ref = a.ref, seq = COALESCE(o.seq, (",
    journal_number!(),
    "))
    FROM UNNEST($2::bigint[], $4::text[]) AS a(pos, ref), cfg
    WHERE o.position = a.pos AND o.status = 0 AND cfg.s IS NOT NULL
      AND o.partition IN (SELECT partition FROM lease)
    RETURNING o.position),
copied AS (
    DELETE FROM custody_sequence_block b
    WHERE b.partition IN (SELECT partition FROM lease)
      AND b.last_pos >= $5 AND b.first_pos <= $6
      AND NOT EXISTS (
          SELECT 1 FROM unnest(b.positions) AS u(pos)
          WHERE u.pos <> 0 AND u.pos NOT IN (SELECT position FROM upd)))
SELECT count(*) FROM upd"
);

// Fencing, as MARK_PUBLISHED: only a pending row of a partition relay $4
// still leases at $5 is written. The lease row is locked FOR SHARE until the
// statement commits, so the lease cannot change hands in between: a relay
// claiming it (FOR UPDATE SKIP LOCKED) skips it this round, and under READ
// COMMITTED a claim committed just before is seen here (FOR SHARE re-reads
// the newest row version and drops it, the owner having changed).
// `fenced`: the row exists in a partition $4 does not lease.
//
// The row's number goes into the version this writes anyway (see
// MARK_PUBLISHED), so the journal row can go once the rest is marked.
const RECORD_FAILURE: &str = concat!(
    "WITH lease AS (
    SELECT l.partition FROM custody_relay_lease l
    WHERE l.owner = $4 AND l.expires_at > $5
      AND l.partition = (SELECT partition FROM custody_outbox WHERE position = $1)
    FOR SHARE),
upd AS (
    UPDATE custody_outbox o
    SET attempts = attempts + 1, last_error = $2, retry_at = $3, seq = COALESCE(o.seq, (",
    journal_number!(),
    "))
    WHERE o.position = $1 AND o.status = 0 AND o.partition IN (SELECT partition FROM lease)
    RETURNING o.position)
SELECT EXISTS (SELECT 1 FROM upd) AS written,
       EXISTS (SELECT 1 FROM custody_outbox o
               WHERE o.position = $1 AND o.partition NOT IN (SELECT partition FROM lease)) AS fenced"
);

// The fence of dead_letter_row, its first statement: lock (FOR SHARE, to the
// commit; see RECORD_FAILURE) the lease of row $1's partition if relay $2
// holds it unexpired at $3. No row: fenced, or the row is gone.
const LEASE_OF_ROW: &str = "\
SELECT l.partition FROM custody_relay_lease l
WHERE l.owner = $2 AND l.expires_at > $3
  AND l.partition = (SELECT partition FROM custody_outbox WHERE position = $1)
FOR SHARE";

const ROW_STATUS: &str = "SELECT status FROM custody_outbox WHERE position = $1";

const MARK_DEAD: &str = concat!(
    "UPDATE custody_outbox o SET status = 2, last_error = $2, seq = COALESCE(o.seq, (",
    journal_number!(),
    "))
WHERE o.position = $1 AND o.status = 0
RETURNING ",
    outbox_columns!(),
    ", o.seq"
);

// Numbering (OutboxStore::assign_sequences), one statement: lock the lease
// rows `relay` still holds unexpired ($1, $3, $4); among positions $2 (between
// $5 and $6), take the pending rows without a number of those partitions;
// give each the number a journal row already holds for it (numbered before,
// by a relay that crashed or lost its lease before marking), and number the
// rest per (partition, topic) in position order from custody_sequence's
// next_seq (1 for a new pair); journal the new numbers (one row per
// (partition, topic)) and store the next ones. Rows of partitions not leased
// are left unnumbered (fencing). The data-modifying CTEs share one snapshot;
// the FOR UPDATE on the lease rows serializes two numberings of a partition.
// `IN (SELECT … FROM lease)`, not a join: the planner estimates one lease row
// and would scan the batch's positions once per leased partition.
//
// Numbers go to the journal (custody_sequence_block, migration 0006), not
// into the outbox rows: an UPDATE would write a second version of every wide
// row, with an entry in each of its indexes, just before the mark writes the
// next one. The mark copies the numbers into the row it writes anyway.
// Committed with the default synchronous_commit: the numbers must be durable
// before anything carrying them is published.
const ASSIGN_SEQUENCES: &str = concat!(
    "\
WITH lease AS (
    SELECT partition FROM custody_relay_lease
    WHERE owner = $1 AND expires_at > $4 AND partition = ANY($3)
    FOR UPDATE),
cand AS MATERIALIZED (
    SELECT o.position, o.partition, o.topic FROM custody_outbox o
    WHERE o.position = ANY($2) AND o.seq IS NULL AND o.status = 0
      AND o.partition IN (SELECT partition FROM lease)),
known AS MATERIALIZED (",
    journal_entries!("$5", "$6"),
    "),
fresh AS MATERIALIZED (
    SELECT c.position, c.partition, c.topic,
           COALESCE(q.next_seq, 1)
             + row_number() OVER (PARTITION BY c.partition, c.topic ORDER BY c.position) - 1 AS seq
    FROM cand c
    LEFT JOIN custody_sequence q ON q.partition = c.partition AND q.topic = c.topic
    WHERE c.position NOT IN (SELECT pos FROM known)),
journal AS (
    INSERT INTO custody_sequence_block (partition, topic, first_pos, last_pos, positions, seqs)
    SELECT partition, topic, min(position), max(position),
           array_agg(position ORDER BY position), array_agg(seq ORDER BY position)
    FROM fresh GROUP BY partition, topic),
bump AS (
    INSERT INTO custody_sequence (partition, topic, next_seq)
    SELECT partition, topic, max(seq) + 1 FROM fresh GROUP BY partition, topic
    ON CONFLICT (partition, topic) DO UPDATE SET next_seq = EXCLUDED.next_seq)
SELECT position, seq FROM fresh
UNION ALL
SELECT k.pos, k.seq FROM known k WHERE k.pos IN (SELECT position FROM cand)"
);

// Journal rows every entry of which is copied into its outbox row (or whose
// row is gone or no longer pending), in every partition relay $1 holds:
// what the marks left behind (a batch marked in parts, a relay that crashed
// between numbering and marking).
const SWEEP_JOURNAL: &str = "\
DELETE FROM custody_sequence_block b
WHERE b.partition IN (
      SELECT partition FROM custody_relay_lease WHERE owner = $1 AND expires_at > $2)
  AND NOT EXISTS (
      SELECT 1 FROM unnest(b.positions) AS u(pos)
      JOIN custody_outbox o ON o.position = u.pos
      WHERE o.status = 0 AND o.seq IS NULL)";

// A relay's heartbeat ($1 id, $2 now, $3 this process's instance token):
// refused (no row written) while the id's heartbeat is live (not older than
// $4) and carries another token. NULL: a heartbeat from before migration 0009.
const HEARTBEAT: &str = "\
INSERT INTO custody_relay_member (relay, heartbeat_at, instance) VALUES ($1, $2, $3)
ON CONFLICT (relay) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at, instance = EXCLUDED.instance
WHERE custody_relay_member.instance IS NULL
   OR custody_relay_member.instance = EXCLUDED.instance
   OR custody_relay_member.heartbeat_at < $4";

// A skip marker in place of a numbered message the relay dead-lettered
// (see custody_core::sequence): pending, same partition and number.
const INSERT_SKIP_MARKER: &str = "INSERT INTO custody_outbox
    (id, kind, topic, msg_key, partition, message_type, content_type, headers, payload, created_at, seq)
VALUES ($1, 'event', $2, $3, $4, $5, 'application/json', $6, $7, $8, $9)";

// Retention (OutboxStore::prune). Safe to run next to producers, relays and
// readers because:
// - only `status <> 0` rows are candidates: pending rows are never touched,
//   and a dead row (status 2) was copied into custody_dead_letter in the
//   same transaction that set its status (dead_letter_row);
// - the NOT EXISTS keeps every row some embedded reader has not read yet, in
//   the readers' own (txid, position) order (PgEmbeddedSubscriber): a row is
//   deleted only if every checkpoint is at or past it. Checkpoints only move
//   forward, so an older view of them (the subquery keeps the statement's
//   snapshot) can only keep more rows, never fewer;
// - FOR UPDATE SKIP LOCKED: a row another transaction is changing (e.g. an
//   operator's redrive) is skipped, never waited on, and the status / time
//   conditions are re-checked on the newest row version after locking; two
//   relays pruning at once take disjoint rows;
// - LIMIT bounds the statement: one short transaction holds at most $3 row
//   locks and produces at most $3 dead tuples for autovacuum to reclaim.
// `COALESCE(published_at, enqueued_at)` is published_at for published rows
// and enqueued_at for dead ones (they have no published_at); it is spelled
// exactly as in the expression index custody_outbox_done (migration 0002),
// whose ordered range scan stops after $3 rows instead of visiting every row
// kept for the retention window. Oldest first, which is also roughly
// position order. `= ANY(ARRAY(..))` keeps the outer delete on the primary
// key.
const PRUNE: &str = "\
DELETE FROM custody_outbox
WHERE position = ANY(ARRAY(
    SELECT o.position
    FROM custody_outbox o
    WHERE o.status <> 0
      AND COALESCE(o.published_at, o.enqueued_at) < $2
      AND o.partition = ANY($1)
      AND NOT EXISTS (
          SELECT 1 FROM custody_checkpoint c
          WHERE (c.txid, c.position) < (o.txid, o.position))
    ORDER BY COALESCE(o.published_at, o.enqueued_at)
    LIMIT $3
    FOR UPDATE OF o SKIP LOCKED))";

pub(crate) const INSERT_DEAD_LETTER: &str = "\
INSERT INTO custody_dead_letter
    (message_id, origin, topic, msg_key, message_type, payload, envelope, error, attempts, dead_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

impl PgOutbox {
    /// An outbox on `pool` with 16 partitions; enqueue sends NOTIFY.
    pub fn new(pool: PgPool) -> Self {
        let waiter = Waiter::new(Wake::new(pool.clone()));
        PgOutbox {
            pool,
            partitions: DEFAULT_PARTITIONS,
            notify: true,
            gate: NotifyGate::new(DEFAULT_NOTIFY_INTERVAL),
            waiter,
            producer: Default::default(),
            numberings: Default::default(),
            key_locks: true,
            instance: process_instance(),
        }
    }

    /// Whether [`PgOutbox::enqueue`] and [`PgOutbox::enqueue_batch`] take
    /// the transaction-scoped advisory lock of each message key (default
    /// true). **For measurement only** (`custody bench outbox
    /// --no-key-locks`): without the locks, two transactions that enqueue
    /// the same key can commit out of position order, and the key's messages
    /// then reach consumers in an order that depends on timing
    /// (docs/SEQUENCES.md, "Order per key").
    pub fn with_key_locks(mut self, on: bool) -> Self {
        self.key_locks = on;
        self
    }

    /// Use `token` as this handle's relay instance token instead of the
    /// process's (a random one per process). The token is stored with a
    /// relay's heartbeat: [`OutboxStore::acquire_leases`] refuses a relay id
    /// whose live heartbeat carries another token
    /// ([`Error::RelayIdInUse`]). Tests use it to play two processes.
    pub fn with_instance(mut self, token: impl Into<String>) -> Self {
        self.instance = Arc::from(token.into());
        self
    }

    /// Hash keys into `n` partitions (at least 1). Every producer and relay
    /// of one outbox must use the same number.
    pub fn with_partitions(mut self, n: u32) -> Self {
        self.partitions = n.max(1);
        self
    }

    /// Whether [`PgOutbox::enqueue`] sends `NOTIFY custody_outbox` (default
    /// true, at most once per [`DEFAULT_NOTIFY_INTERVAL`] unless
    /// [`PgOutbox::with_notify_interval`] says otherwise). NOTIFY
    /// wakes sleeping relays at once, but a committing transaction that
    /// notified takes a global lock; switch it off to rely on the relays'
    /// polling alone.
    pub fn with_notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// Send NOTIFY from at most one enqueue per `every` (default
    /// [`DEFAULT_NOTIFY_INTERVAL`]; zero: from every enqueue). Notifying
    /// transactions commit one at a time (see [`PgOutbox::with_notify`]); a
    /// relay that is busy polls every `busy-poll-interval` and needs no
    /// NOTIFY, an idle one is woken by the first enqueue after a quiet
    /// `every`. Keep it below the relays' `poll-interval`.
    pub fn with_notify_interval(mut self, every: Duration) -> Self {
        self.gate = NotifyGate::new(every);
        self
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Insert `msg` into the outbox on `conn`, joining the caller's
    /// transaction (pass `&mut *tx`). Returns its position. The message is
    /// published iff the transaction commits.
    ///
    /// Takes the transaction-scoped advisory lock of `msg`'s key first (see
    /// `KEY_LOCK_NAMESPACE`), held to the commit or rollback: another
    /// transaction enqueueing the same key waits for this one, so each key's
    /// messages are published in commit order. Keep such transactions short;
    /// enqueue several keys of one transaction with [`PgOutbox::enqueue_batch`]
    /// (it locks them in sorted order) or always in the same key order, or
    /// two transactions can deadlock (PostgreSQL aborts one with a retryable
    /// error).
    #[tracing::instrument(skip_all, fields(message_id = %msg.id, topic = %msg.topic))]
    pub async fn enqueue(&self, conn: &mut PgConnection, msg: &Message) -> Result<i64> {
        msg.validate()?;
        let headers = headers_json(msg)?;
        let partition = self.partition_of(msg)?;
        let notify = self.notify && self.gate.take();
        let sql = INSERT_ONE[usize::from(self.key_locks)][usize::from(notify)];
        let query = sqlx::query_scalar(sql)
            .bind(msg.id)
            .bind(msg.kind.as_str())
            .bind(&msg.topic)
            .bind(&msg.key)
            .bind(partition)
            .bind(&msg.message_type)
            .bind(&msg.content_type)
            .bind(headers)
            .bind(&msg.payload)
            .bind(msg.created_at);
        let query = if self.key_locks {
            query.bind(KEY_LOCK_NAMESPACE).bind(key_lock(&msg.key))
        } else {
            query
        };
        let position: i64 = query.fetch_one(conn).await.map_err(db("enqueue"))?;
        Ok(position)
    }

    /// Insert `msgs` in one statement on `conn` (the caller's transaction).
    /// Returns their positions, in the order of `msgs`, increasing. Locks
    /// every distinct key first, in sorted order (see [`PgOutbox::enqueue`]).
    #[tracing::instrument(skip_all, fields(count = msgs.len()))]
    pub async fn enqueue_batch(
        &self,
        conn: &mut PgConnection,
        msgs: &[Message],
    ) -> Result<Vec<i64>> {
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        let n = msgs.len();
        let mut ids = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        let mut topics = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut partitions = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut content_types = Vec::with_capacity(n);
        let mut headers = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut created = Vec::with_capacity(n);
        for msg in msgs {
            msg.validate()?;
            ids.push(msg.id);
            kinds.push(msg.kind.as_str());
            topics.push(msg.topic.as_str());
            keys.push(msg.key.as_str());
            partitions.push(self.partition_of(msg)?);
            types.push(msg.message_type.as_str());
            content_types.push(msg.content_type.as_str());
            headers.push(headers_json(msg)?);
            payloads.push(msg.payload.as_slice());
            created.push(msg.created_at);
        }
        let notify = self.notify && self.gate.take();
        let sql = INSERT_BATCH[usize::from(self.key_locks)][usize::from(notify)];
        let query = sqlx::query(sql)
            .bind(&ids)
            .bind(&kinds)
            .bind(&topics)
            .bind(&keys)
            .bind(&partitions)
            .bind(&types)
            .bind(&content_types)
            .bind(&headers)
            .bind(&payloads)
            .bind(&created);
        let query = if self.key_locks {
            // sorted and distinct: every batch locks in the same order (no deadlock)
            let mut locks: Vec<i32> = keys.iter().map(|k| key_lock(k)).collect();
            locks.sort_unstable();
            locks.dedup();
            query.bind(KEY_LOCK_NAMESPACE).bind(locks)
        } else {
            query
        };
        let rows = query.fetch_all(conn).await.map_err(db("enqueue batch"))?;
        let mut by_id = HashMap::with_capacity(rows.len());
        for row in &rows {
            let id: Uuid = row.try_get(0).map_err(db("enqueue batch"))?;
            let position: i64 = row.try_get(1).map_err(db("enqueue batch"))?;
            by_id.insert(id, position);
        }
        let positions = ids
            .iter()
            .map(|id| {
                by_id.get(id).copied().ok_or_else(|| {
                    Error::store(
                        "postgres",
                        "enqueue batch",
                        false,
                        format!("the insert returned no position for message {id}"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(positions)
    }

    fn partition_of(&self, msg: &Message) -> Result<i32> {
        i32::try_from(partition_for(&msg.key, self.partitions)).map_err(|_| {
            Error::Config(format!(
                "{} partitions do not fit PostgreSQL's INT column; use fewer",
                self.partitions
            ))
        })
    }

    /// Pending rows (FETCH_BATCH, or FETCH_BATCH_EXCLUDING when rows are
    /// `in_flight`); rows that cannot be read as messages are dead-lettered
    /// so they never block the relay (invariant 6).
    #[tracing::instrument(skip_all, fields(partitions = partitions.len(), limit))]
    async fn fetch(
        &self,
        partitions: &[u32],
        limit: usize,
        in_flight: &[i64],
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxRecord>> {
        const OP: &str = "fetch outbox batch";
        // Notifications from here on count as new for wait_for_new.
        self.waiter.catch_up();
        let parts: Vec<i32> = partitions
            .iter()
            .filter_map(|p| i32::try_from(*p).ok())
            .collect();
        if parts.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let query = if in_flight.is_empty() {
            sqlx::query(FETCH_BATCH)
        } else {
            sqlx::query(FETCH_BATCH_EXCLUDING)
        };
        let query = query.bind(&parts).bind(limit).bind(now);
        let query = if in_flight.is_empty() {
            query
        } else {
            query.bind(in_flight)
        };
        let rows = query.fetch_all(&self.pool).await.map_err(db(OP))?;
        let mut out = Vec::with_capacity(rows.len());
        for raw in &rows {
            let republish: i32 = raw.try_get(12).map_err(db(OP))?;
            let seq: Option<i64> = raw.try_get(13).map_err(db(OP))?;
            let row = OutboxRow::from_row(raw).map_err(db(OP))?;
            let (position, partition, attempts) = (row.position, row.partition, row.attempts);
            match (row.into_message(), u32::try_from(partition)) {
                (Ok(message), Ok(partition)) => out.push(OutboxRecord {
                    position,
                    partition,
                    attempts: u32::try_from(attempts).unwrap_or(0),
                    republish: u32::try_from(republish).unwrap_or(0),
                    sequence: seq.and_then(|s| u64::try_from(s).ok()),
                    message,
                }),
                (Err(bad), _) => self.dead_letter_malformed(position, &bad.reason).await?,
                (Ok(_), Err(_)) => {
                    self.dead_letter_malformed(position, "negative partition")
                        .await?
                }
            }
        }
        Ok(out)
    }

    async fn dead_letter_malformed(&self, position: i64, reason: &str) -> Result<()> {
        tracing::warn!(
            position,
            reason,
            "custody: outbox row is not a valid message; dead-lettering it"
        );
        // Unfenced: the fetch does not know the relay. A row that cannot be
        // read is never published by anyone, and MARK_DEAD's `status = 0`
        // lets only one relay move it.
        self.dead_letter_row(None, position, reason, Utc::now())
            .await
            .map(|_| ())
    }

    /// Move the pending row at `position` to the dead letters (with a skip
    /// marker when numbered), in one transaction; fenced by `relay`'s lease
    /// on the row's partition when `relay` is given.
    async fn dead_letter_row(
        &self,
        relay: Option<&str>,
        position: i64,
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<RowWrite> {
        let mut tx = self.pool.begin().await.map_err(db("dead letter"))?;
        if let Some(relay) = relay {
            let leased: Option<i32> = sqlx::query_scalar(LEASE_OF_ROW)
                .bind(position)
                .bind(relay)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("dead letter"))?;
            if leased.is_none() {
                let status: Option<i16> = sqlx::query_scalar(ROW_STATUS)
                    .bind(position)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db("dead letter"))?;
                return Ok(match status {
                    Some(_) => RowWrite::Fenced,
                    None => RowWrite::NotPending,
                });
            }
        }
        let row = sqlx::query(MARK_DEAD)
            .bind(position)
            .bind(error)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db("dead letter"))?;
        let Some(row) = row else {
            // already published or dead: nothing to do
            return Ok(RowWrite::NotPending);
        };
        let seq: Option<i64> = row.try_get(12).map_err(db("dead letter"))?;
        let row = OutboxRow::from_row(&row).map_err(db("dead letter"))?;
        if let Some(seq) = seq.filter(|_| row.message_type != SKIP_TYPE) {
            // keep the number accounted for: consumers see the marker, not a gap
            let marker = serde_json::json!({ "skipped": row.id, "reason": error });
            let headers = serde_json::json!({ SKIPPED_HEADER: row.id }).to_string();
            sqlx::query(INSERT_SKIP_MARKER)
                .bind(Uuid::now_v7())
                .bind(&row.topic)
                .bind(&row.key)
                .bind(row.partition)
                .bind(SKIP_TYPE)
                .bind(headers)
                .bind(marker.to_string().into_bytes())
                .bind(now)
                .bind(seq)
                .execute(&mut *tx)
                .await
                .map_err(db("dead letter"))?;
        }
        let attempts = row.attempts;
        let (message_id, topic, key, message_type) = (
            row.id,
            row.topic.clone(),
            row.key.clone(),
            row.message_type.clone(),
        );
        let (payload, envelope) = match row.into_message() {
            Ok(msg) => {
                let envelope = serde_json::to_string(&msg).ok();
                (msg.payload, envelope)
            }
            Err(bad) => (bad.payload, None),
        };
        sqlx::query(INSERT_DEAD_LETTER)
            .bind(message_id)
            .bind("relay")
            .bind(topic)
            .bind(key)
            .bind(message_type)
            .bind(payload)
            .bind(envelope)
            .bind(error)
            .bind(attempts)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db("dead letter"))?;
        tx.commit().await.map_err(db("dead letter"))?;
        Ok(RowWrite::Written)
    }
}

/// How many numberings run between two sweeps of the sequence journal (an
/// outbox handle sweeps at its first numbering, so a restarted relay clears
/// what its predecessor left at once).
const SWEEP_EVERY: u64 = 64;

/// This process's relay instance token: random, the same for every
/// [`PgOutbox`] of the process, different in every process.
fn process_instance() -> Arc<str> {
    static TOKEN: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    TOKEN
        .get_or_init(|| Arc::from(Uuid::now_v7().simple().to_string()))
        .clone()
}

/// The smallest and largest of `positions` (`(0, -1)`, an empty range, for none).
fn span(positions: &[i64]) -> (i64, i64) {
    let lo = positions.iter().copied().min().unwrap_or(0);
    let hi = positions.iter().copied().max().unwrap_or(-1);
    (lo, hi)
}

fn headers_json(msg: &Message) -> Result<String> {
    serde_json::to_string(&msg.headers)
        .map_err(|e| Error::InvalidMessage(format!("headers do not serialize to JSON: {e}")))
}

fn ttl_interval(ttl: Duration) -> chrono::Duration {
    chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX)
}

impl OutboxStore for PgOutbox {
    fn partitions(&self) -> u32 {
        self.partitions
    }

    // Several relays may call this at the same time. Each step locks rows
    // so that no partition is ever handed to two relays:
    // - lease rows are created with ON CONFLICT DO NOTHING, in partition
    //   order, so concurrent creators wait for each other without deadlock;
    // - stale members are deleted through FOR UPDATE SKIP LOCKED, so a relay
    //   never waits on another's heartbeat (two relays deleting each other's
    //   stale rows would otherwise deadlock);
    // - renewing updates only rows whose owner is still `relay` (an UPDATE
    //   re-checks its WHERE after waiting on a row lock), so a lease taken
    //   over after expiry is not renewed;
    // - claiming selects free/expired rows FOR UPDATE SKIP LOCKED: rows
    //   another relay is claiming are skipped instead of waited on, and the
    //   WHERE is re-checked on the newest row version after locking, so a
    //   row claimed and committed meanwhile is not taken twice.
    // Only the claim can take rows from someone else, and it never waits, so
    // no two acquirers wait on each other in a cycle.
    #[tracing::instrument(skip_all, fields(relay))]
    async fn acquire_leases(
        &self,
        relay: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<u32>> {
        const OP: &str = "acquire leases";
        let p = i32::try_from(self.partitions)
            .map_err(|_| Error::Config("too many partitions".to_owned()))?;
        let ttl = ttl_interval(ttl);
        let expires = now
            .checked_add_signed(ttl)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let stale_before = now
            .checked_sub_signed(ttl)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut tx = self.pool.begin().await.map_err(db(OP))?;

        // The heartbeat, refused when the id's live heartbeat is another
        // process's: ON CONFLICT locks the member row (a concurrent first
        // heartbeat of the same id is waited for and then seen), and the
        // WHERE keeps a live holder's row as it is.
        let beat = sqlx::query(HEARTBEAT)
            .bind(relay)
            .bind(now)
            .bind(&*self.instance)
            .bind(stale_before)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        if beat.rows_affected() == 0 {
            let (other, heartbeat_at): (Option<String>, DateTime<Utc>) = sqlx::query_as(
                "SELECT instance, heartbeat_at FROM custody_relay_member WHERE relay = $1",
            )
            .bind(relay)
            .fetch_one(&mut *tx)
            .await
            .map_err(db(OP))?;
            return Err(Error::RelayIdInUse {
                relay: relay.to_owned(),
                other: other.unwrap_or_default(),
                heartbeat_at,
                live: false,
            });
        }
        sqlx::query(
            "DELETE FROM custody_relay_member WHERE relay IN (
                 SELECT relay FROM custody_relay_member
                 WHERE heartbeat_at < $1 AND relay <> $2
                 FOR UPDATE SKIP LOCKED)",
        )
        .bind(stale_before)
        .bind(relay)
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;

        let existing: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM custody_relay_lease WHERE partition >= 0 AND partition < $1",
        )
        .bind(p)
        .fetch_one(&mut *tx)
        .await
        .map_err(db(OP))?;
        if existing < i64::from(p) {
            sqlx::query(
                "INSERT INTO custody_relay_lease (partition)
                 SELECT g FROM generate_series(0, $1 - 1) AS g ORDER BY g
                 ON CONFLICT (partition) DO NOTHING",
            )
            .bind(p)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        }

        let live: i64 = sqlx::query_scalar("SELECT count(*) FROM custody_relay_member")
            .fetch_one(&mut *tx)
            .await
            .map_err(db(OP))?;
        let live = u64::try_from(live).unwrap_or(0);

        let held: Vec<i32> = sqlx::query_scalar(
            "UPDATE custody_relay_lease SET expires_at = $2
             WHERE owner = $1 AND partition >= 0 AND partition < $3
             RETURNING partition",
        )
        .bind(relay)
        .bind(expires)
        .bind(p)
        .fetch_all(&mut *tx)
        .await
        .map_err(db(OP))?;
        let held: Vec<u32> = held
            .into_iter()
            .filter_map(|p| u32::try_from(p).ok())
            .collect();
        // The fair share (custody_core::plan_leases); the claim of free rows
        // is the SQL below, lowest first, as the plan says.
        let plan = plan_leases(self.partitions, live, &held);

        let mut claimed = Vec::new();
        if !plan.release.is_empty() {
            let release: Vec<i32> = plan
                .release
                .iter()
                .filter_map(|p| i32::try_from(*p).ok())
                .collect();
            sqlx::query(
                "UPDATE custody_relay_lease SET owner = NULL, expires_at = NULL
                 WHERE partition = ANY($1) AND owner = $2",
            )
            .bind(&release)
            .bind(relay)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        } else if plan.claim > 0 {
            let rows: Vec<i32> = sqlx::query_scalar(
                "UPDATE custody_relay_lease SET owner = $1, expires_at = $2
                 WHERE partition IN (
                     SELECT partition FROM custody_relay_lease
                     WHERE partition >= 0 AND partition < $3
                       AND (owner IS NULL OR expires_at IS NULL OR expires_at <= $4)
                     ORDER BY partition
                     LIMIT $5
                     FOR UPDATE SKIP LOCKED)
                 RETURNING partition",
            )
            .bind(relay)
            .bind(expires)
            .bind(p)
            .bind(now)
            .bind(i64::try_from(plan.claim).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(db(OP))?;
            claimed = rows
                .into_iter()
                .filter_map(|p| u32::try_from(p).ok())
                .collect();
        }
        tx.commit().await.map_err(db(OP))?;
        Ok(plan.held_after(&claimed))
    }

    async fn release_leases(&self, relay: &str) -> Result<()> {
        const OP: &str = "release leases";
        let mut tx = self.pool.begin().await.map_err(db(OP))?;
        // Only what this process holds: a refused duplicate of a live
        // relay's id must not release that relay's leases.
        sqlx::query(
            "UPDATE custody_relay_lease SET owner = NULL, expires_at = NULL
             WHERE owner = $1 AND NOT EXISTS (
                 SELECT 1 FROM custody_relay_member
                 WHERE relay = $1 AND instance IS DISTINCT FROM $2)",
        )
        .bind(relay)
        .bind(&*self.instance)
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;
        sqlx::query("DELETE FROM custody_relay_member WHERE relay = $1 AND instance = $2")
            .bind(relay)
            .bind(&*self.instance)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        tx.commit().await.map_err(db(OP))
    }

    async fn fetch_batch(
        &self,
        partitions: &[u32],
        limit: usize,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxRecord>> {
        self.fetch(partitions, limit, &[], now).await
    }

    async fn fetch_batch_excluding(
        &self,
        partitions: &[u32],
        limit: usize,
        in_flight: &[i64],
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxRecord>> {
        self.fetch(partitions, limit, in_flight, now).await
    }

    async fn producer_id(&self) -> Result<Option<String>> {
        let id = self
            .producer
            .get_or_try_init(|| async {
                // renewed when the database's history could have forked
                // (a clone, a restore, a failover: migration 0008)
                sqlx::query_scalar::<_, String>("SELECT custody_producer_id()")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db("read producer id (run `custody migrate`)"))
            })
            .await?;
        Ok(Some(id.clone()))
    }

    #[tracing::instrument(skip_all, fields(relay, records = records.len()))]
    async fn assign_sequences(
        &self,
        relay: &str,
        records: &mut Vec<OutboxRecord>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        const OP: &str = "number outbox rows";
        let positions: Vec<i64> = records
            .iter()
            .filter(|r| r.sequence.is_none())
            .map(|r| r.position)
            .collect();
        if positions.is_empty() {
            return Ok(());
        }
        let mut parts: Vec<i32> = records
            .iter()
            .filter(|r| r.sequence.is_none())
            .filter_map(|r| i32::try_from(r.partition).ok())
            .collect();
        parts.sort_unstable();
        parts.dedup();
        if self.numberings.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == 0 {
            sqlx::query(SWEEP_JOURNAL)
                .bind(relay)
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(db("sweep the sequence journal"))?;
        }
        let (lo, hi) = span(&positions);
        let numbers: HashMap<i64, i64> = sqlx::query_as::<_, (i64, i64)>(ASSIGN_SEQUENCES)
            .bind(relay)
            .bind(&positions)
            .bind(&parts)
            .bind(now)
            .bind(lo)
            .bind(hi)
            .fetch_all(&self.pool)
            .await
            .map_err(db(OP))?
            .into_iter()
            .collect();
        keep_numbered(relay, records, |position| {
            numbers
                .get(&position)
                .and_then(|seq| u64::try_from(*seq).ok())
        });
        Ok(())
    }

    async fn mark_published(
        &self,
        relay: &str,
        acked: &[(i64, PublishAck)],
        now: DateTime<Utc>,
    ) -> Result<u64> {
        if acked.is_empty() {
            return Ok(0);
        }
        let positions: Vec<i64> = acked.iter().map(|(p, _)| *p).collect();
        let refs: Vec<Option<String>> = acked.iter().map(|(_, a)| a.reference()).collect();
        let (lo, hi) = span(&positions);
        let marked: i64 = sqlx::query_scalar(MARK_PUBLISHED)
            .bind(relay)
            .bind(&positions)
            .bind(now)
            .bind(&refs)
            .bind(lo)
            .bind(hi)
            .fetch_one(&self.pool)
            .await
            .map_err(db("mark published"))?;
        Ok(u64::try_from(marked).unwrap_or(0))
    }

    async fn record_failure(
        &self,
        relay: &str,
        position: i64,
        error: &str,
        retry_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<RowWrite> {
        let (written, fenced): (bool, bool) = sqlx::query_as(RECORD_FAILURE)
            .bind(position)
            .bind(error)
            .bind(retry_at)
            .bind(relay)
            .bind(now)
            .fetch_one(&self.pool)
            .await
            .map_err(db("record publish failure"))?;
        Ok(if written {
            RowWrite::Written
        } else if fenced {
            RowWrite::Fenced
        } else {
            RowWrite::NotPending
        })
    }

    async fn dead_letter(
        &self,
        relay: &str,
        position: i64,
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<RowWrite> {
        self.dead_letter_row(Some(relay), position, error, now)
            .await
    }

    #[tracing::instrument(skip_all, fields(partitions = partitions.len(), limit))]
    async fn prune(
        &self,
        partitions: &[u32],
        older_than: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64> {
        let parts: Vec<i32> = partitions
            .iter()
            .filter_map(|p| i32::try_from(*p).ok())
            .collect();
        if parts.is_empty() || limit == 0 {
            return Ok(0);
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let done = sqlx::query(PRUNE)
            .bind(&parts)
            .bind(older_than)
            .bind(limit)
            .execute(&self.pool)
            .await
            .map_err(db("prune outbox"))?;
        Ok(done.rows_affected())
    }

    async fn wait_for_new(&self, timeout: Duration) {
        self.waiter.wait(timeout).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{NotifyGate, PRUNE};

    #[test]
    fn the_notify_gate_lets_one_enqueue_per_interval_notify() {
        let gate = NotifyGate::new(Duration::from_secs(3600));
        assert!(gate.take(), "the first enqueue notifies");
        assert!(!gate.take(), "the next ones within the interval do not");
        assert!(!gate.take());
        let every = NotifyGate::new(Duration::ZERO);
        assert!(every.take() && every.take(), "zero: every enqueue notifies");
    }

    /// PRUNE must come off the partial expression index (an ordered range
    /// scan that stops after the limit), not a scan of the retention window.
    #[tokio::test]
    async fn prune_uses_the_retention_index() -> anyhow::Result<()> {
        let Some(db) = custody_testkit::postgres_db().await? else {
            return Ok(());
        };
        let pool = crate::connect(&db.url).await?;
        crate::migrate(&pool).await?;
        // the planner picks an index only when the table is not tiny
        sqlx::query(
            "INSERT INTO custody_outbox (id, kind, topic, msg_key, partition, message_type,
                 content_type, payload, created_at, status, published_at)
             SELECT gen_random_uuid(), 'event', 't', 'k', g % 16, 'T', 'application/json',
                    '\\x00', now(), CASE WHEN g % 10 = 0 THEN 0 ELSE 1 END,
                    now() - (g || ' seconds')::interval
             FROM generate_series(1, 50000) g",
        )
        .execute(&pool)
        .await?;
        sqlx::query("ANALYZE custody_outbox").execute(&pool).await?;
        let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {PRUNE}"))
            .bind(vec![0_i32, 1, 2, 3])
            .bind(chrono::Utc::now() - chrono::Duration::hours(1))
            .bind(100_i64)
            .fetch_all(&pool)
            .await?;
        let plan = plan.join("\n");
        assert!(plan.contains("custody_outbox_done"), "plan:\n{plan}");
        assert!(
            !plan.contains("Seq Scan on custody_outbox"),
            "plan:\n{plan}"
        );
        Ok(())
    }
}
