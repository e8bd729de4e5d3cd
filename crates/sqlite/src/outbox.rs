//! The transactional outbox and the relay's view of it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use custody_core::sequence::{SKIPPED_HEADER, SKIP_TYPE};
use custody_core::{
    partition_for, Error, Message, OutboxRecord, OutboxStore, PublishAck, Result, RowWrite,
};
use sqlx::{Connection, Row, SqliteConnection, SqlitePool};
use tokio::sync::{Notify, OnceCell};
use tokio::time::Instant;
use uuid::Uuid;

use crate::error::{map_err, store_error};
use crate::row::{outbox_columns, OutboxRow};
use crate::{duration_ms, to_ms};

/// Partitions of a new [`SqliteOutbox`].
pub const DEFAULT_PARTITIONS: u32 = 16;

/// Rows per `INSERT` in [`SqliteOutbox::enqueue_batch`]: 10 columns each,
/// well under SQLite's default limit of 32,766 bound parameters (and under
/// the 999 of builds older than 3.32).
const BATCH_ROWS: usize = 90;

const INSERT_HEAD: &str = "INSERT INTO custody_outbox \
     (id, kind, topic, msg_key, partition, message_type, content_type, headers, payload, created_at) VALUES ";
const INSERT_ROW: &str = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

/// The relay's next batch. `o.status = 0` as a literal so the partial
/// `custody_outbox_pending` index applies.
///
/// No visibility guard: SQLite runs one write transaction at a time and holds
/// the write lock from its first write to its commit, so a row can never
/// commit below a position a reader has already seen (positions become
/// visible in commit order). This is also what keeps each key in commit
/// order: two transactions that enqueue the same key are serialized from the
/// first insert to the commit by that single write lock, so position order
/// is commit order (PostgreSQL needs the key's advisory lock for the same).
///
/// The NOT EXISTS leaves out every message whose key has a parked message
/// (`retry_at > now`), whatever its position: nothing of a key overtakes its
/// parked message; other keys flow.
const FETCH_BATCH: &str = concat!(
    "SELECT ",
    outbox_columns!(),
    ", republish \
     FROM custody_outbox AS o \
     WHERE o.status = 0 \
       AND o.partition IN (SELECT value FROM json_each(?1)) \
       AND NOT EXISTS ( \
           SELECT 1 FROM custody_outbox AS p \
           WHERE p.status = 0 AND p.retry_at IS NOT NULL \
             AND p.partition = o.partition AND p.msg_key = o.msg_key \
             AND p.retry_at > ?2) \
     ORDER BY o.position \
     LIMIT ?3"
);

/// Fencing: only rows in partitions whose unexpired lease `relay` holds.
/// `?1` is a JSON array of `[position, publish_ref]` pairs (UPDATE … FROM,
/// SQLite 3.33+).
const MARK_PUBLISHED: &str = "UPDATE custody_outbox \
     SET status = 1, published_at = ?3, publish_ref = a.ref \
     FROM (SELECT json_extract(value, '$[0]') AS pos, json_extract(value, '$[1]') AS ref \
           FROM json_each(?1)) AS a \
     WHERE custody_outbox.position = a.pos AND custody_outbox.status = 0 \
       AND custody_outbox.partition IN (SELECT partition FROM custody_relay_lease \
                         WHERE owner = ?2 AND expires_at > ?3)";

/// Fenced like MARK_PUBLISHED: only a pending row of a partition whose
/// unexpired lease `?4` holds at `?5`.
const RECORD_FAILURE: &str = "UPDATE custody_outbox \
     SET attempts = attempts + 1, last_error = ?2, retry_at = ?3 \
     WHERE position = ?1 AND status = 0 \
       AND partition IN (SELECT partition FROM custody_relay_lease \
                         WHERE owner = ?4 AND expires_at > ?5)";

/// Whether the row at `?1` is in a partition `?2` leases at `?3`; no row
/// when the row is gone. Tells a fenced write from one whose row is no
/// longer pending.
const LEASED_ROW: &str = "SELECT partition IN (SELECT partition FROM custody_relay_lease \
                         WHERE owner = ?2 AND expires_at > ?3), status \
     FROM custody_outbox WHERE position = ?1";

const SELECT_ROW: &str = concat!(
    "SELECT ",
    outbox_columns!(),
    " FROM custody_outbox WHERE position = ?1"
);

const DEAD_LETTER_COPY: &str = "INSERT INTO custody_dead_letter \
     (message_id, origin, topic, msg_key, message_type, payload, envelope, error, attempts, dead_at) \
     SELECT id, 'relay', topic, msg_key, message_type, payload, ?2, ?3, attempts, ?4 \
     FROM custody_outbox WHERE position = ?1 AND status = 0";

/// A skip marker in place of the numbered row at `?1` that is being
/// dead-lettered (see `custody_core::sequence`): pending, same topic, key,
/// partition and number, so consumers account for the number instead of
/// seeing a gap. Topic, key and partition are copied by SQL, so a damaged
/// row still leaves its marker. Nothing is inserted for an unnumbered row,
/// for a row that is no longer pending, or for a marker itself (`?3`).
const INSERT_SKIP_MARKER: &str = "INSERT INTO custody_outbox \
     (id, kind, topic, msg_key, partition, message_type, content_type, headers, payload, created_at, seq) \
     SELECT ?2, 'event', topic, msg_key, partition, ?3, 'application/json', \
            json_object(?6, CAST(id AS TEXT)), \
            CAST(json_object('skipped', CAST(id AS TEXT), 'reason', ?4) AS BLOB), ?5, seq \
     FROM custody_outbox \
     WHERE position = ?1 AND status = 0 AND seq IS NOT NULL AND message_type IS NOT ?3";

/// Numbering ([`OutboxStore::assign_sequences`]), step 1: the partitions
/// among `?1` whose unexpired lease `?2` holds (the fence of
/// MARK_PUBLISHED, with the same lease condition). Runs in a
/// `BEGIN IMMEDIATE` transaction: SQLite's single write lock is held from
/// here to the commit, so no other relay can take the lease, number rows or
/// move a `next_seq` in between.
const LEASED: &str = "SELECT partition FROM custody_relay_lease \
     WHERE owner = ?2 AND expires_at > ?3 AND partition IN (SELECT value FROM json_each(?1))";

/// Step 1b: the next numbers of the leased partitions' topics (a missing
/// (partition, topic) starts at 1).
const NEXT_SEQS: &str = "SELECT partition, topic, next_seq FROM custody_sequence \
     WHERE partition IN (SELECT value FROM json_each(?1))";

/// Step 2: the current state of the rows to number (another relay may have
/// numbered, published or dead-lettered one since it was fetched).
const NUMBERING_STATE: &str = "SELECT position, status, seq FROM custody_outbox \
     WHERE position IN (SELECT value FROM json_each(?1))";

/// Step 3: `?1` is a JSON array of `[position, seq]` pairs. The guard
/// (`seq IS NULL AND status = 0`) never numbers a row twice.
const SET_SEQ: &str = "UPDATE custody_outbox SET seq = a.seq \
     FROM (SELECT json_extract(value, '$[0]') AS pos, json_extract(value, '$[1]') AS seq \
           FROM json_each(?1)) AS a \
     WHERE custody_outbox.position = a.pos AND custody_outbox.seq IS NULL \
       AND custody_outbox.status = 0";

/// Step 4: `?1` is a JSON array of `[partition, topic, next_seq]`
/// (`WHERE true`: SQLite's rule for an upsert whose rows come from a SELECT).
const SET_NEXT_SEQ: &str = "INSERT INTO custody_sequence (partition, topic, next_seq) \
     SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]') \
     FROM json_each(?1) WHERE true \
     ON CONFLICT (partition, topic) DO UPDATE SET next_seq = excluded.next_seq";

const DEAD_LETTER_MARK: &str =
    "UPDATE custody_outbox SET status = 2, last_error = ?2, retry_at = NULL \
     WHERE position = ?1 AND status = 0";

/// Retention ([`OutboxStore::prune`]). Safe because:
/// - only `status <> 0` rows are candidates: pending rows are never touched,
///   and a dead row (status 2) was copied into custody_dead_letter in the
///   transaction that set its status;
/// - embedded readers go in position order and a checkpoint is the highest
///   position a reader acknowledged, so rows at or below the lowest
///   checkpoint have been read by every reader (no checkpoint, no limit);
/// - it runs in one `BEGIN IMMEDIATE` transaction (SQLite has one writer),
///   so the checkpoints it reads cannot move back before the delete, and
///   `LIMIT ?3` keeps that write lock short;
/// - AUTOINCREMENT never hands out a deleted position again, so readers'
///   `position > checkpoint` cursors stay valid.
///
/// `COALESCE(published_at, enqueued_at)` (published_at for published rows,
/// enqueued_at for dead ones, which have none) is spelled as in the partial
/// expression index `custody_outbox_done` (migration 0002), so the oldest
/// rows come off an ordered index range and the scan stops after `?3` rows.
const PRUNE: &str = "DELETE FROM custody_outbox WHERE position IN ( \
     SELECT position FROM custody_outbox \
     WHERE status <> 0 \
       AND COALESCE(published_at, enqueued_at) < ?2 \
       AND partition IN (SELECT value FROM json_each(?1)) \
       AND position <= COALESCE((SELECT MIN(position) FROM custody_checkpoint), 9223372036854775807) \
     ORDER BY COALESCE(published_at, enqueued_at) \
     LIMIT ?3)";

/// The highest position ever inserted and committed (AUTOINCREMENT's high-water mark).
const HIGH_WATER: &str =
    "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'custody_outbox'), 0)";

/// Longest a woken waiter waits for a signalled commit to become visible.
const VISIBILITY_WAIT: Duration = Duration::from_secs(1);

/// In-process "new messages committed" signal, shared by clones of an outbox
/// and the readers attached to it.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    notify: Notify,
    /// Highest position whose commit has been signalled.
    committed: AtomicI64,
}

impl Signal {
    /// Wake every current waiter, and the next one if nobody waits right now.
    pub(crate) fn wake(&self) {
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    fn committed(&self, position: i64) {
        self.committed.fetch_max(position, Ordering::AcqRel);
        self.wake();
    }

    /// A future resolved by the next [`Signal::wake`].
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// SQLite calls the commit hook just before the commit becomes visible to
    /// other connections (and before it is synced). Wait until the signalled
    /// position is visible, so the woken reader does not look too early and
    /// then sleep a whole poll interval.
    pub(crate) async fn await_visible(&self, pool: &SqlitePool, deadline: Instant) {
        let want = self.committed.load(Ordering::Acquire);
        let deadline = deadline.min(Instant::now() + VISIBILITY_WAIT);
        loop {
            match sqlx::query_scalar::<_, i64>(HIGH_WATER)
                .fetch_one(pool)
                .await
            {
                Ok(seen) if seen >= want => return,
                Ok(_) => {}
                // The caller's own query will report the problem.
                Err(_) => return,
            }
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// The transactional outbox on SQLite.
///
/// [`enqueue`](Self::enqueue) joins the caller's transaction, so a message
/// exists if and only if the business change committed. The
/// [`OutboxStore`] implementation is what the relay uses. Clones share the
/// pool and the in-process wake-up signal.
#[derive(Debug, Clone)]
pub struct SqliteOutbox {
    pool: SqlitePool,
    partitions: u32,
    signal: Arc<Signal>,
    /// The producer id, read once (it never changes).
    producer: Arc<OnceCell<String>>,
    /// This process's relay instance token (see [`SqliteOutbox::with_instance`]).
    instance: Arc<str>,
}

/// This process's relay instance token: random, the same for every
/// [`SqliteOutbox`] of the process, different in every process.
fn process_instance() -> Arc<str> {
    static TOKEN: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    TOKEN
        .get_or_init(|| Arc::from(Uuid::now_v7().simple().to_string()))
        .clone()
}

impl SqliteOutbox {
    /// An outbox on `pool` (migrated with [`crate::migrate`]) with
    /// [`DEFAULT_PARTITIONS`] (16) partitions.
    pub fn new(pool: SqlitePool) -> Self {
        SqliteOutbox {
            pool,
            partitions: DEFAULT_PARTITIONS,
            signal: Arc::new(Signal::default()),
            producer: Arc::new(OnceCell::new()),
            instance: process_instance(),
        }
    }

    /// Use `token` as this handle's relay instance token instead of the
    /// process's (a random one per process). The token is stored with a
    /// relay's heartbeat: [`OutboxStore::acquire_leases`] refuses a relay id
    /// whose live heartbeat carries another token
    /// ([`Error::RelayIdInUse`]). Tests use it to play two processes.
    #[must_use]
    pub fn with_instance(mut self, token: impl Into<String>) -> Self {
        self.instance = Arc::from(token.into());
        self
    }

    /// Use `n` partitions (at least 1). Every producer and relay of one
    /// outbox must use the same number.
    #[must_use]
    pub fn with_partitions(mut self, n: u32) -> Self {
        self.partitions = n.max(1);
        self
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub(crate) fn signal(&self) -> Arc<Signal> {
        self.signal.clone()
    }

    /// Add `msg` to the outbox on `conn`, normally the caller's transaction
    /// (`&mut *tx`): the message commits or rolls back with it. Returns the
    /// message's position.
    ///
    /// Relays and readers in this process are woken when the transaction
    /// commits (through an SQLite commit hook installed on `conn`, which
    /// replaces any commit or rollback hook set there before). Other
    /// processes see the message at their next poll.
    pub async fn enqueue(&self, conn: &mut SqliteConnection, msg: &Message) -> Result<i64> {
        let positions = self.enqueue_batch(conn, std::slice::from_ref(msg)).await?;
        positions.into_iter().next().ok_or_else(|| {
            Error::store(
                "sqlite",
                "enqueue",
                false,
                "INSERT ... RETURNING returned no position",
            )
        })
    }

    /// Add `msgs` in order with multi-row `INSERT`s (chunked under SQLite's
    /// bound-parameter limit). Returns their positions, increasing, in the
    /// order of `msgs`. See [`enqueue`](Self::enqueue).
    pub async fn enqueue_batch(
        &self,
        conn: &mut SqliteConnection,
        msgs: &[Message],
    ) -> Result<Vec<i64>> {
        let mut positions = Vec::with_capacity(msgs.len());
        for chunk in msgs.chunks(BATCH_ROWS) {
            let mut rows = Vec::with_capacity(chunk.len());
            for msg in chunk {
                msg.validate()?;
                let headers = serde_json::to_string(&msg.headers).map_err(|e| {
                    Error::InvalidMessage(format!("headers do not serialize to JSON: {e}"))
                })?;
                rows.push((msg, headers));
            }
            let mut sql = String::with_capacity(INSERT_HEAD.len() + chunk.len() * 32 + 20);
            sql.push_str(INSERT_HEAD);
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(INSERT_ROW);
            }
            // SQLite returns RETURNING rows in insertion order for a plain
            // multi-row VALUES insert; sort anyway rather than rely on it.
            sql.push_str(" RETURNING position");
            let mut query = sqlx::query_scalar::<_, i64>(&sql);
            for (msg, headers) in rows {
                query = query
                    .bind(msg.id.hyphenated().to_string())
                    .bind(msg.kind.as_str())
                    .bind(msg.topic.as_str())
                    .bind(msg.key.as_str())
                    .bind(i64::from(partition_for(&msg.key, self.partitions)))
                    .bind(msg.message_type.as_str())
                    .bind(msg.content_type.as_str())
                    .bind(headers)
                    .bind(msg.payload.as_slice())
                    .bind(to_ms(msg.created_at));
            }
            let mut got = query
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| enqueue_error(e, chunk))?;
            got.sort_unstable();
            positions.extend(got);
        }
        if let Some(&last) = positions.last() {
            self.signal_on_commit(conn, last).await?;
        }
        Ok(positions)
    }

    /// Wake relays and readers in this process (e.g. after inserting outbox
    /// rows by other means). Waiters then re-read the outbox.
    pub fn notify(&self) {
        self.signal.wake();
    }

    /// Arrange for waiters to be woken once `position` is committed on `conn`.
    async fn signal_on_commit(&self, conn: &mut SqliteConnection, position: i64) -> Result<()> {
        if !conn.is_in_transaction() {
            // Autocommit: the row is already committed.
            self.signal.committed(position);
            return Ok(());
        }
        let armed = Arc::new(AtomicI64::new(position));
        let on_commit = armed.clone();
        let signal = self.signal.clone();
        let mut handle = conn
            .lock_handle()
            .await
            .map_err(map_err("enqueue: install commit hook"))?;
        // One-shot: later commits on this pooled connection must not wake
        // readers for nothing, and a rollback disarms it.
        handle.set_commit_hook(move || {
            let p = on_commit.swap(0, Ordering::AcqRel);
            if p > 0 {
                signal.committed(p);
            }
            true
        });
        handle.set_rollback_hook(move || armed.store(0, Ordering::Release));
        Ok(())
    }

    /// Move the pending row at `position` to the dead-letter table; a
    /// numbered row leaves a pending skip marker with its number.
    ///
    /// Fenced when `relay` is given: only a row of a partition `relay`
    /// still leases is moved (checked under the write lock, so the lease
    /// cannot change hands before the commit).
    async fn dead_letter_row(
        &self,
        relay: Option<&str>,
        position: i64,
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<RowWrite> {
        const OP: &str = "dead-letter outbox message";
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err(OP))?;
        if let Some(relay) = relay {
            let state: Option<(bool, i64)> = sqlx::query_as(LEASED_ROW)
                .bind(position)
                .bind(relay)
                .bind(to_ms(now))
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_err(OP))?;
            match state {
                None => return Ok(RowWrite::NotPending),
                Some((false, _)) => return Ok(RowWrite::Fenced),
                Some((true, status)) if status != 0 => return Ok(RowWrite::NotPending),
                Some((true, _)) => {}
            }
        }
        let row = sqlx::query(SELECT_ROW)
            .bind(position)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        let Some(row) = row else {
            return Ok(RowWrite::NotPending);
        };
        let row = OutboxRow::decode(&row).map_err(map_err(OP))?;
        // Before the row leaves status 0 (the statement's condition).
        let marker = sqlx::query(INSERT_SKIP_MARKER)
            .bind(position)
            .bind(Uuid::now_v7().hyphenated().to_string())
            .bind(SKIP_TYPE)
            .bind(error)
            .bind(to_ms(now))
            .bind(SKIPPED_HEADER)
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        // The envelope lets an operator redrive the message as it was.
        let envelope = match &row.message {
            Ok(m) => serde_json::to_string(m).ok(),
            Err(_) => None,
        };
        sqlx::query(DEAD_LETTER_COPY)
            .bind(position)
            .bind(envelope)
            .bind(error)
            .bind(to_ms(now))
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        let marked = sqlx::query(DEAD_LETTER_MARK)
            .bind(position)
            .bind(error)
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        tx.commit().await.map_err(map_err(OP))?;
        if marker.rows_affected() > 0 {
            self.signal.wake();
        }
        Ok(if marked.rows_affected() > 0 {
            RowWrite::Written
        } else {
            RowWrite::NotPending
        })
    }
}

fn enqueue_error(e: sqlx::Error, chunk: &[Message]) -> Error {
    let unique = e
        .as_database_error()
        .is_some_and(|d| d.is_unique_violation());
    if unique {
        let ids: Vec<String> = chunk.iter().map(|m| m.id.to_string()).collect();
        return Error::InvalidMessage(format!(
            "a message id is already in the outbox (one of {}); give every message a fresh id ({e})",
            ids.join(", ")
        ));
    }
    store_error("enqueue", e)
}

fn republish_of(row: &sqlx::sqlite::SqliteRow) -> u32 {
    row.try_get::<i64, _>("republish")
        .ok()
        .and_then(|r| u32::try_from(r).ok())
        .unwrap_or(0)
}

pub(crate) fn json_list<T: std::fmt::Display>(items: &[T]) -> String {
    let mut s = String::with_capacity(items.len() * 6 + 2);
    s.push('[');
    for (i, x) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&x.to_string());
    }
    s.push(']');
    s
}

impl OutboxStore for SqliteOutbox {
    fn partitions(&self) -> u32 {
        self.partitions
    }

    async fn acquire_leases(
        &self,
        relay: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<u32>> {
        const OP: &str = "acquire relay leases";
        let now_ms = to_ms(now);
        let ttl_ms = duration_ms(ttl);
        let expires = now_ms.saturating_add(ttl_ms);
        let p = i64::from(self.partitions);
        // BEGIN IMMEDIATE takes the write lock at once: the whole
        // read-decide-write below sees and changes one consistent state.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err(OP))?;
        // The heartbeat, refused (no row written) while the id's heartbeat
        // is live and carries another process's token (NULL: from before
        // migration 0006).
        let beat = sqlx::query(
            "INSERT INTO custody_relay_member (relay, heartbeat_at, instance) VALUES (?1, ?2, ?3) \
             ON CONFLICT (relay) DO UPDATE \
             SET heartbeat_at = excluded.heartbeat_at, instance = excluded.instance \
             WHERE custody_relay_member.instance IS NULL \
                OR custody_relay_member.instance = excluded.instance \
                OR custody_relay_member.heartbeat_at < ?4",
        )
        .bind(relay)
        .bind(now_ms)
        .bind(&*self.instance)
        .bind(now_ms.saturating_sub(ttl_ms))
        .execute(&mut *tx)
        .await
        .map_err(map_err(OP))?;
        if beat.rows_affected() == 0 {
            let (other, heartbeat_ms): (Option<String>, i64) = sqlx::query_as(
                "SELECT instance, heartbeat_at FROM custody_relay_member WHERE relay = ?1",
            )
            .bind(relay)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err(OP))?;
            return Err(Error::RelayIdInUse {
                relay: relay.to_owned(),
                other: other.unwrap_or_default(),
                heartbeat_at: DateTime::<Utc>::from_timestamp_millis(heartbeat_ms)
                    .unwrap_or(DateTime::<Utc>::MIN_UTC),
                live: false,
            });
        }
        sqlx::query("DELETE FROM custody_relay_member WHERE heartbeat_at < ?1")
            .bind(now_ms.saturating_sub(ttl_ms))
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        sqlx::query(
            "WITH RECURSIVE s(p) AS (SELECT 0 UNION ALL SELECT p + 1 FROM s WHERE p + 1 < ?1) \
             INSERT OR IGNORE INTO custody_relay_lease (partition) SELECT p FROM s",
        )
        .bind(p)
        .execute(&mut *tx)
        .await
        .map_err(map_err(OP))?;
        // Leases on partitions beyond the configured count are dropped.
        sqlx::query(
            "UPDATE custody_relay_lease SET owner = NULL, expires_at = NULL \
             WHERE owner = ?1 AND partition >= ?2",
        )
        .bind(relay)
        .bind(p)
        .execute(&mut *tx)
        .await
        .map_err(map_err(OP))?;
        let live: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM custody_relay_member")
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        let live = u32::try_from(live.max(1)).unwrap_or(u32::MAX);
        let share = usize::try_from(self.partitions.div_ceil(live)).unwrap_or(usize::MAX);

        let rows = sqlx::query(
            "SELECT partition, owner, expires_at FROM custody_relay_lease \
             WHERE partition < ?1 ORDER BY partition",
        )
        .bind(p)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err(OP))?;
        let mut held = Vec::new();
        let mut free = Vec::new();
        for row in &rows {
            let partition: i64 = row.try_get("partition").map_err(map_err(OP))?;
            let owner: Option<String> = row.try_get("owner").map_err(map_err(OP))?;
            let expires_at: Option<i64> = row.try_get("expires_at").map_err(map_err(OP))?;
            match owner {
                Some(o) if o == relay => held.push(partition),
                Some(_) if expires_at.is_some_and(|e| e > now_ms) => {}
                _ => free.push(partition),
            }
        }
        // Above the fair share: give back the highest partitions.
        let release: Vec<i64> = if held.len() > share {
            held.split_off(share)
        } else {
            Vec::new()
        };
        // Below it: claim the lowest free or expired ones.
        let want = share.saturating_sub(held.len());
        held.extend(free.into_iter().take(want));
        held.sort_unstable();

        if !release.is_empty() {
            sqlx::query(
                "UPDATE custody_relay_lease SET owner = NULL, expires_at = NULL \
                 WHERE owner = ?2 AND partition IN (SELECT value FROM json_each(?1))",
            )
            .bind(json_list(&release))
            .bind(relay)
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        }
        if !held.is_empty() {
            sqlx::query(
                "UPDATE custody_relay_lease SET owner = ?2, expires_at = ?3 \
                 WHERE partition IN (SELECT value FROM json_each(?1))",
            )
            .bind(json_list(&held))
            .bind(relay)
            .bind(expires)
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        }
        tx.commit().await.map_err(map_err(OP))?;
        Ok(held
            .into_iter()
            .filter_map(|p| u32::try_from(p).ok())
            .collect())
    }

    async fn release_leases(&self, relay: &str) -> Result<()> {
        const OP: &str = "release relay leases";
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err(OP))?;
        // Only what this process holds: a refused duplicate of a live
        // relay's id must not release that relay's leases.
        sqlx::query(
            "UPDATE custody_relay_lease SET owner = NULL, expires_at = NULL WHERE owner = ?1 \
             AND NOT EXISTS (SELECT 1 FROM custody_relay_member \
                             WHERE relay = ?1 AND instance IS NOT ?2)",
        )
        .bind(relay)
        .bind(&*self.instance)
        .execute(&mut *tx)
        .await
        .map_err(map_err(OP))?;
        sqlx::query("DELETE FROM custody_relay_member WHERE relay = ?1 AND instance = ?2")
            .bind(relay)
            .bind(&*self.instance)
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        tx.commit().await.map_err(map_err(OP))
    }

    async fn fetch_batch(
        &self,
        partitions: &[u32],
        limit: usize,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxRecord>> {
        const OP: &str = "fetch outbox batch";
        if partitions.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(FETCH_BATCH)
            .bind(json_list(partitions))
            .bind(to_ms(now))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err(OP))?;
        let mut batch = Vec::with_capacity(rows.len());
        for raw in &rows {
            let row = OutboxRow::decode(raw).map_err(map_err(OP))?;
            match row.message {
                Ok(message) => batch.push(OutboxRecord {
                    position: row.position,
                    partition: row.partition,
                    attempts: row.attempts,
                    republish: republish_of(raw),
                    sequence: row.seq,
                    message,
                }),
                // A damaged row can never be published; keep it from
                // blocking its key forever (docs/ARCHITECTURE.md invariant 6).
                Err(bad) => {
                    let error = format!(
                        "outbox row cannot be read, so it was not published: {}; \
                         fix the row and redrive it from the dead-letter table",
                        bad.reason
                    );
                    tracing::warn!(position = row.position, %error, "dead-lettering damaged outbox row");
                    // Unfenced: fetch_batch does not know the relay. Nobody
                    // can publish the row, and `status = 0` lets one relay move it.
                    let _ = self
                        .dead_letter_row(None, row.position, &error, now)
                        .await?;
                }
            }
        }
        Ok(batch)
    }

    async fn producer_id(&self) -> Result<Option<String>> {
        let id = self
            .producer
            .get_or_try_init(|| async {
                // renewed when this file is a copy (crate::producer)
                crate::producer::producer_id(&self.pool, to_ms(Utc::now())).await
            })
            .await?;
        Ok(Some(id.clone()))
    }

    async fn assign_sequences(
        &self,
        relay: &str,
        records: &mut Vec<OutboxRecord>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        const OP: &str = "number outbox rows";
        let mut positions: Vec<i64> = Vec::new();
        let mut parts: Vec<u32> = Vec::new();
        for r in records.iter().filter(|r| r.sequence.is_none()) {
            positions.push(r.position);
            parts.push(r.partition);
        }
        if positions.is_empty() {
            return Ok(());
        }
        positions.sort_unstable();
        parts.sort_unstable();
        parts.dedup();
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err(OP))?;
        let leased: Vec<u32> = sqlx::query_scalar::<_, i64>(LEASED)
            .bind(json_list(&parts))
            .bind(relay)
            .bind(to_ms(now))
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err(OP))?
            .into_iter()
            .filter_map(|p| u32::try_from(p).ok())
            .collect();
        let mut given: HashMap<i64, u64> = HashMap::new();
        if !leased.is_empty() {
            let mut next: HashMap<(u32, String), i64> = HashMap::new();
            for row in sqlx::query(NEXT_SEQS)
                .bind(json_list(&leased))
                .fetch_all(&mut *tx)
                .await
                .map_err(map_err(OP))?
            {
                let p: i64 = row.try_get("partition").map_err(map_err(OP))?;
                let topic: String = row.try_get("topic").map_err(map_err(OP))?;
                let n: i64 = row.try_get("next_seq").map_err(map_err(OP))?;
                if let Ok(p) = u32::try_from(p) {
                    next.insert((p, topic), n.max(1));
                }
            }
            let mut state: HashMap<i64, (i64, Option<i64>)> = HashMap::new();
            for row in sqlx::query(NUMBERING_STATE)
                .bind(json_list(&positions))
                .fetch_all(&mut *tx)
                .await
                .map_err(map_err(OP))?
            {
                let pos: i64 = row.try_get("position").map_err(map_err(OP))?;
                let status: i64 = row.try_get("status").map_err(map_err(OP))?;
                let seq: Option<i64> = row.try_get("seq").map_err(map_err(OP))?;
                state.insert(pos, (status, seq));
            }
            // Position order within each (partition, topic); a number is
            // only taken when its row really gets it, so the numbering has
            // no holes.
            let mut pairs: Vec<(i64, i64)> = Vec::new();
            let mut bumped: HashMap<(u32, &str), i64> = HashMap::new();
            let mut by_position: Vec<&OutboxRecord> = records
                .iter()
                .filter(|r| r.sequence.is_none() && leased.contains(&r.partition))
                .collect();
            by_position.sort_by_key(|r| r.position);
            for r in by_position {
                match state.get(&r.position) {
                    Some((0, None)) => {
                        let topic = r.message.topic.as_str();
                        let n = bumped.entry((r.partition, topic)).or_insert_with(|| {
                            next.get(&(r.partition, topic.to_owned()))
                                .copied()
                                .unwrap_or(1)
                        });
                        pairs.push((r.position, *n));
                        given.insert(r.position, u64::try_from(*n).unwrap_or(0));
                        *n += 1;
                    }
                    // Numbered since it was fetched (by this relay, or by the
                    // partition's previous holder): keep that number.
                    Some((0, Some(seq))) => {
                        given.insert(r.position, u64::try_from(*seq).unwrap_or(0));
                    }
                    // Published, dead-lettered or pruned meanwhile.
                    _ => {}
                }
            }
            if !pairs.is_empty() {
                let json = serde_json::to_string(&pairs)
                    .map_err(|e| Error::store("sqlite", OP, false, e))?;
                let done = sqlx::query(SET_SEQ)
                    .bind(json)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err(OP))?;
                if done.rows_affected() != pairs.len() as u64 {
                    // Cannot happen under the write lock; never leave a hole.
                    return Err(Error::store(
                        "sqlite",
                        OP,
                        true,
                        format!(
                            "numbered {} of {} rows; the outbox changed under the write lock",
                            done.rows_affected(),
                            pairs.len()
                        ),
                    ));
                }
                let bumps: Vec<(u32, &str, i64)> =
                    bumped.iter().map(|((p, t), n)| (*p, *t, *n)).collect();
                let json = serde_json::to_string(&bumps)
                    .map_err(|e| Error::store("sqlite", OP, false, e))?;
                sqlx::query(SET_NEXT_SEQ)
                    .bind(json)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err(OP))?;
            }
        }
        tx.commit().await.map_err(map_err(OP))?;
        let before = records.len();
        records.retain_mut(|r| {
            if r.sequence.is_some() {
                return true;
            }
            match given.get(&r.position) {
                Some(&seq) if seq > 0 => {
                    r.sequence = Some(seq);
                    true
                }
                _ => false,
            }
        });
        if records.len() < before {
            tracing::debug!(
                relay,
                dropped = before - records.len(),
                "unnumbered rows of partitions no longer leased (or no longer pending) left out"
            );
        }
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
        let pairs: Vec<(i64, Option<String>)> =
            acked.iter().map(|(p, a)| (*p, a.reference())).collect();
        let pairs = serde_json::to_string(&pairs)
            .map_err(|e| Error::store("sqlite", "mark published", false, e))?;
        let done = sqlx::query(MARK_PUBLISHED)
            .bind(pairs)
            .bind(relay)
            .bind(to_ms(now))
            .execute(&self.pool)
            .await
            .map_err(map_err("mark published"))?;
        Ok(done.rows_affected())
    }

    async fn record_failure(
        &self,
        relay: &str,
        position: i64,
        error: &str,
        retry_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<RowWrite> {
        const OP: &str = "record publish failure";
        let done = sqlx::query(RECORD_FAILURE)
            .bind(position)
            .bind(error)
            .bind(to_ms(retry_at))
            .bind(relay)
            .bind(to_ms(now))
            .execute(&self.pool)
            .await
            .map_err(map_err(OP))?;
        if done.rows_affected() > 0 {
            return Ok(RowWrite::Written);
        }
        let state: Option<(bool, i64)> = sqlx::query_as(LEASED_ROW)
            .bind(position)
            .bind(relay)
            .bind(to_ms(now))
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err(OP))?;
        Ok(match state {
            Some((false, _)) => RowWrite::Fenced,
            _ => RowWrite::NotPending,
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

    async fn prune(
        &self,
        partitions: &[u32],
        older_than: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64> {
        const OP: &str = "prune outbox";
        if partitions.is_empty() || limit == 0 {
            return Ok(0);
        }
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err(OP))?;
        let done = sqlx::query(PRUNE)
            .bind(json_list(partitions))
            .bind(to_ms(older_than))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        tx.commit().await.map_err(map_err(OP))?;
        Ok(done.rows_affected())
    }

    async fn wait_for_new(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        if tokio::time::timeout(timeout, self.signal.notified())
            .await
            .is_ok()
        {
            self.signal.await_visible(&self.pool, deadline).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PRUNE;

    /// PRUNE must come off the partial expression index (an ordered range
    /// that stops after the limit), not a scan of the retention window.
    #[tokio::test]
    async fn prune_uses_the_retention_index() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let pool = crate::connect(&dir.path().join("c.db").to_string_lossy()).await?;
        crate::migrate(&pool).await?;
        let rows = sqlx::query(&format!("EXPLAIN QUERY PLAN {PRUNE}"))
            .bind("[0,1,2]")
            .bind(0_i64)
            .bind(100_i64)
            .fetch_all(&pool)
            .await?;
        let plan: Vec<String> = rows
            .iter()
            .map(|r| sqlx::Row::try_get::<String, _>(r, "detail"))
            .collect::<Result<_, _>>()?;
        let plan = plan.join("\n");
        assert!(plan.contains("custody_outbox_done"), "plan:\n{plan}");
        assert!(!plan.contains("SCAN custody_outbox"), "plan:\n{plan}");
        Ok(())
    }
}
