//! The consumer's idempotent inbox.

use chrono::{DateTime, Utc};
use custody_core::sequence::{advance_floor, plan_acceptance, runs_text};
use custody_core::Attempt;
use custody_core::{
    AcceptedGap, Compaction, DeadLetter, Error, GapAcceptance, GapRange, InboxOutcome, InboxStore,
    Message, PartitionProgress, Redrive, Result, Sequence,
};
use sqlx::{Row, Sqlite, SqlitePool, Transaction};

use crate::error::map_err;
use crate::to_ms;

/// First sight inserts with `duplicates = 0`; a redelivery bumps the counter
/// in the consumer's transaction, so `RETURNING duplicates` tells the two
/// apart in one statement. A numbered message is stored with its stamp
/// (`?5`, `?6`, `?7`; NULL when unnumbered).
///
/// `duplicates = -1` marks a numbered row whose message an operator
/// redrove ([`crate::redrive`] keeps the row so its number stays accounted
/// for): the redrive's record of the message comes back 0, its first sight
/// (any other delivery while the redrive is queued puts the mark back: see
/// [`REDRIVE_QUEUED`]).
///
/// Two statements, so that the caller knows whether the id was new: the
/// insert returns a row only when it inserted one ([`RECORD_AGAIN`] counts
/// the redelivery otherwise). The transaction holds the write lock
/// (`BEGIN IMMEDIATE`), so nothing runs in between.
const RECORD: &str = "INSERT INTO custody_inbox \
     (consumer, message_id, topic, processed_at, producer, producer_partition, seq) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
     ON CONFLICT (consumer, message_id) DO NOTHING \
     RETURNING duplicates";

/// [`RECORD`] for an id recorded before: count the redelivery (a redrive's
/// mark, -1, becomes 0: its first sight).
const RECORD_AGAIN: &str = "UPDATE custody_inbox SET duplicates = duplicates + 1 \
     WHERE consumer = ?1 AND message_id = ?2 RETURNING duplicates";

/// The consumer's floor in one producer partition. Read after RECORD's
/// insert, in the same transaction: on SQLite the transaction holds the
/// write lock (`BEGIN IMMEDIATE`) so no compaction runs in between; the
/// order is kept as on PostgreSQL, where the inserted row is what a
/// concurrent compaction must see (or wait for) before it moves the floor.
const FLOOR: &str = "SELECT floor, forgotten FROM custody_inbox_watermark \
     WHERE consumer = ?1 AND producer = ?2 AND topic = ?3 AND producer_partition = ?4";

/// A numbered message at or below the floor is a duplicate whose row was
/// compacted (or a second id with an accounted-for number): the row just
/// inserted for it goes again, the floor covers it.
const UNRECORD: &str = "DELETE FROM custody_inbox WHERE consumer = ?1 AND message_id = ?2";

/// Whether a redrive of the message is still queued. The consumer engine
/// takes a redrive by deleting its queue row ([`InboxStore::finish_redrive`])
/// before recording the message in the same transaction, so only the
/// redrive's own transaction no longer sees it: the queue row is the one
/// exactly-once token of a redrive.
const REDRIVE_QUEUED: &str =
    "SELECT EXISTS (SELECT 1 FROM custody_redrive WHERE consumer = ?1 AND message_id = ?2)";

/// A delivery that is not the queued redrive of its message: the row keeps
/// (or gets) the redrive's mark, so the redrive is new when it comes.
const KEEP_REDRIVE_MARK: &str =
    "UPDATE custody_inbox SET duplicates = -1 WHERE consumer = ?1 AND message_id = ?2";

/// A numbered message at or below its floor whose id was never recorded,
/// dead-lettered in the handler's transaction, once per id (a replay finds
/// the letter and adds none).
const DEAD_LETTER_UNSEEN: &str = "INSERT INTO custody_dead_letter \
     (message_id, origin, topic, msg_key, message_type, payload, envelope, error, attempts, dead_at) \
     SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, ?9 \
     WHERE NOT EXISTS (SELECT 1 FROM custody_dead_letter WHERE message_id = ?1 AND origin = ?2)";

const INSERT_DEAD_LETTER: &str = "INSERT INTO custody_dead_letter \
     (message_id, origin, topic, msg_key, message_type, payload, envelope, error, attempts, dead_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

/// The inbox row of a dead-lettered message, with its stamp when it was
/// numbered: a dead-lettered number is accounted for, never a gap. A row a
/// redrive marked (`duplicates = -1`) is settled again: the redriven message
/// failed and is dead once more.
const INSERT_DEAD_INBOX: &str = "INSERT INTO custody_inbox \
     (consumer, message_id, topic, processed_at, producer, producer_partition, seq) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
     ON CONFLICT (consumer, message_id) DO UPDATE SET duplicates = MAX(duplicates, 0)";

/// Every (producer, topic, partition) `?1` has a floor for or numbered rows
/// of.
const PARTITIONS: &str = "SELECT producer, topic, producer_partition \
     FROM custody_inbox_watermark WHERE consumer = ?1 \
     UNION \
     SELECT DISTINCT producer, topic, producer_partition FROM custody_inbox \
     WHERE consumer = ?1 AND seq IS NOT NULL AND producer IS NOT NULL \
       AND producer_partition IS NOT NULL";

/// [`InboxStore::progress`]: per (producer, topic, partition) the stored
/// floor and, over the rows above it, the highest number, how many
/// distinct numbers (a skip marker and its original can share one) and the
/// earliest record. The `i.seq > f.floor` join condition implies
/// `seq IS NOT NULL`, so the partial index custody_inbox_seq serves it.
const PROGRESS: &str = "WITH parts(producer, topic, part) AS ( \
         SELECT producer, topic, producer_partition \
         FROM custody_inbox_watermark WHERE consumer = ?1 \
         UNION \
         SELECT DISTINCT producer, topic, producer_partition FROM custody_inbox \
         WHERE consumer = ?1 AND seq IS NOT NULL AND producer IS NOT NULL \
           AND producer_partition IS NOT NULL), \
     floors AS (SELECT p.producer, p.topic, p.part, COALESCE(w.floor, 0) AS floor, \
                       COALESCE(w.compacted, 0) AS compacted \
                FROM parts AS p LEFT JOIN custody_inbox_watermark AS w \
                  ON w.consumer = ?1 AND w.producer = p.producer AND w.topic = p.topic \
                 AND w.producer_partition = p.part) \
     SELECT f.producer, f.topic, f.part, f.floor, f.compacted, MAX(i.seq) AS high, \
            COUNT(DISTINCT i.seq) AS above, MIN(i.processed_at) AS earliest \
     FROM floors AS f LEFT JOIN custody_inbox AS i \
       ON i.consumer = ?1 AND i.producer = f.producer AND i.topic = f.topic \
      AND i.producer_partition = f.part AND i.seq > f.floor \
     GROUP BY f.producer, f.topic, f.part, f.floor, f.compacted \
     ORDER BY f.producer, f.topic, f.part";

const ENSURE_WATERMARK: &str = "INSERT INTO custody_inbox_watermark \
     (consumer, producer, topic, producer_partition, floor, compacted, updated_at) \
     VALUES (?1, ?2, ?3, ?4, 0, 0, ?5) \
     ON CONFLICT (consumer, producer, topic, producer_partition) DO NOTHING";

const READ_WATERMARK: &str = "SELECT floor FROM custody_inbox_watermark \
     WHERE consumer = ?1 AND producer = ?2 AND topic = ?3 AND producer_partition = ?4";

/// The lowest `?6` distinct numbers above the floor `?5`, in order.
const SEQS_ABOVE: &str = "SELECT DISTINCT seq FROM custody_inbox \
     WHERE consumer = ?1 AND producer = ?2 AND topic = ?3 AND producer_partition = ?4 \
       AND seq > ?5 \
     ORDER BY seq LIMIT ?6";

/// Rows at or below the (new) floor `?5` recorded before `?6`, at most `?7`:
/// the floor answers for them now. Rows inside the keep window stay for
/// reconciliation.
/// Returns the numbers deleted: the highest becomes `forgotten`.
const DELETE_COMPACTED: &str = "DELETE FROM custody_inbox WHERE consumer = ?1 AND message_id IN ( \
     SELECT message_id FROM custody_inbox \
     WHERE consumer = ?1 AND producer = ?2 AND topic = ?3 AND producer_partition = ?4 \
       AND seq <= ?5 AND processed_at < ?6 \
     ORDER BY seq LIMIT ?7) \
     RETURNING seq";

const UPDATE_WATERMARK: &str = "UPDATE custody_inbox_watermark \
     SET floor = ?5, compacted = compacted + ?6, updated_at = ?7, \
         forgotten = MAX(forgotten, ?8) \
     WHERE consumer = ?1 AND producer = ?2 AND topic = ?3 AND producer_partition = ?4";

/// [`InboxStore::accept_gap`]: the floor and whether the partition has
/// history (a floor, compacted rows or an earlier acceptance). The
/// transaction holds the write lock: no record or compaction runs meanwhile.
const ACCEPT_READ: &str = "SELECT w.floor, \
       (w.floor > 0 OR w.compacted > 0 OR EXISTS ( \
           SELECT 1 FROM custody_gap_accepted AS a \
           WHERE a.consumer = w.consumer AND a.producer = w.producer AND a.topic = w.topic \
             AND a.producer_partition = w.producer_partition)) \
     FROM custody_inbox_watermark AS w \
     WHERE w.consumer = ?1 AND w.producer = ?2 AND w.topic = ?3 AND w.producer_partition = ?4";

/// The numbers recorded in `?5 < seq <= ?7`, at most `?6`.
const ACCEPT_PRESENT: &str = "SELECT DISTINCT seq FROM custody_inbox \
     WHERE consumer = ?1 AND producer = ?2 AND topic = ?3 AND producer_partition = ?4 \
       AND seq > ?5 AND seq <= ?7 \
     ORDER BY seq LIMIT ?6";

const ACCEPT_RAISE: &str = "UPDATE custody_inbox_watermark SET floor = ?5, updated_at = ?6 \
     WHERE consumer = ?1 AND producer = ?2 AND topic = ?3 AND producer_partition = ?4";

const ACCEPT_AUDIT: &str = "INSERT INTO custody_gap_accepted \
     (consumer, producer, topic, producer_partition, old_floor, new_floor, numbers, count, \
      accepted_by, reason, accepted_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

/// Most recorded numbers an acceptance reads between the floor and the end
/// of its range (more: accept a shorter range first).
pub const ACCEPT_MAX_ROWS: usize = 100_000;

/// The stamp of `message` as inbox columns (all NULL when unnumbered).
fn stamp_columns(stamp: Option<&Sequence>) -> (Option<&str>, Option<i64>, Option<i64>) {
    match stamp.and_then(|s| Some((s, i64::try_from(s.seq).ok()?))) {
        Some((s, seq)) => (
            Some(s.producer.as_str()),
            Some(i64::from(s.partition)),
            Some(seq),
        ),
        None => (None, None, None),
    }
}

fn limit_i64(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn count_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A consumer's inbox in its own SQLite database.
///
/// The consumer engine calls [`InboxStore::begin`], [`InboxStore::record`],
/// runs the handler on the same transaction, then [`InboxStore::commit`]: the
/// effects and the inbox row commit together.
#[derive(Debug, Clone)]
pub struct SqliteInbox {
    pool: SqlitePool,
}

impl SqliteInbox {
    /// An inbox on `pool` (migrated with [`crate::migrate`]).
    pub fn new(pool: SqlitePool) -> Self {
        SqliteInbox { pool }
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

// Poison detection (migration 0007); see START_ATTEMPTS in
// crates/postgres/src/inbox.rs. One write transaction per group, before the
// handlers run; a run starting a message again does not count again.
const START_ATTEMPT: &str = "\
INSERT INTO custody_inbox_attempt (consumer, message_id, run, alone, started_at)
VALUES (?1, ?2, ?3, ?4, ?5)
ON CONFLICT (consumer, message_id) DO UPDATE
SET crashes = crashes + (run <> excluded.run AND alone),
    prev_run = CASE WHEN run = excluded.run THEN prev_run ELSE run END,
    run = excluded.run,
    alone = CASE WHEN run = excluded.run THEN alone OR excluded.alone ELSE excluded.alone END,
    started_at = excluded.started_at
RETURNING coalesce(prev_run <> run, 0), crashes";

// Inside the handler's transaction: the attempts finish iff the effects commit.
const FINISH_ATTEMPT: &str =
    "DELETE FROM custody_inbox_attempt WHERE consumer = ?1 AND message_id = ?2";

const IS_RECORDED: &str =
    "SELECT EXISTS (SELECT 1 FROM custody_inbox WHERE consumer = ?1 AND message_id = ?2)";

impl InboxStore for SqliteInbox {
    type Tx = Transaction<'static, Sqlite>;

    /// `BEGIN IMMEDIATE`: the transaction takes the write lock at once, so a
    /// handler that reads before it writes cannot fail with a stale snapshot
    /// (`SQLITE_BUSY_SNAPSHOT`) halfway through.
    async fn begin(&self) -> Result<Self::Tx> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err("begin inbox transaction"))
    }

    async fn record(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        message: &Message,
        now: DateTime<Utc>,
    ) -> Result<InboxOutcome> {
        const OP: &str = "record in inbox";
        let id = message.id.hyphenated().to_string();
        let stamp = Sequence::of(message);
        let (producer, partition, seq) = stamp_columns(stamp.as_ref());
        let inserted: Option<i64> = sqlx::query_scalar(RECORD)
            .bind(consumer)
            .bind(&id)
            .bind(message.topic.as_str())
            .bind(to_ms(now))
            .bind(producer)
            .bind(partition)
            .bind(seq)
            .fetch_optional(&mut **tx)
            .await
            .map_err(map_err(OP))?;
        let duplicates = match inserted {
            Some(d) => d,
            None => sqlx::query_scalar(RECORD_AGAIN)
                .bind(consumer)
                .bind(&id)
                .fetch_one(&mut **tx)
                .await
                .map_err(map_err(OP))?,
        };
        if duplicates != 0 {
            return Ok(InboxOutcome::Duplicate);
        }
        // New so far (first sight, or the mark of a redrive taken). While a
        // redrive of the message is queued, only the redrive itself is new:
        // a copy arriving first (a replay, a republish) must not use it up.
        // The write lock (BEGIN IMMEDIATE) orders this against the redrive.
        let redrive_queued: bool = sqlx::query_scalar(REDRIVE_QUEUED)
            .bind(consumer)
            .bind(&id)
            .fetch_one(&mut **tx)
            .await
            .map_err(map_err(OP))?;
        if redrive_queued {
            sqlx::query(KEEP_REDRIVE_MARK)
                .bind(consumer)
                .bind(&id)
                .execute(&mut **tx)
                .await
                .map_err(map_err(OP))?;
            return Ok(InboxOutcome::Duplicate);
        }
        let (Some(producer), Some(partition), Some(seq)) = (producer, partition, seq) else {
            return Ok(InboxOutcome::New);
        };
        // Second statement, after the insert (see FLOOR).
        let floor: Option<(i64, i64)> = sqlx::query_as(FLOOR)
            .bind(consumer)
            .bind(producer)
            .bind(message.topic.as_str())
            .bind(partition)
            .fetch_optional(&mut **tx)
            .await
            .map_err(map_err(OP))?;
        let (floor, forgotten) = floor.unwrap_or((0, 0));
        if seq > floor {
            return Ok(InboxOutcome::New);
        }
        // At or below the floor (rare): the row just made goes again.
        sqlx::query(UNRECORD)
            .bind(consumer)
            .bind(&id)
            .execute(&mut **tx)
            .await
            .map_err(map_err(OP))?;
        if inserted.is_some() && seq > forgotten {
            // Above `forgotten` every accounted-for number still has its
            // rows: this id was never recorded. Another message with a used
            // number (the producer's history forked) or one that came after
            // its number was accepted as lost: dead-lettered, never dropped.
            let error = custody_core::sequence::unseen_number_reason(message);
            tracing::warn!(consumer, message_id = %message.id, topic = %message.topic, "{error}");
            sqlx::query(DEAD_LETTER_UNSEEN)
                .bind(&id)
                .bind(format!("consumer:{consumer}"))
                .bind(message.topic.as_str())
                .bind(message.key.as_str())
                .bind(message.message_type.as_str())
                .bind(message.payload.as_slice())
                .bind(serde_json::to_string(message).ok())
                .bind(&error)
                .bind(to_ms(now))
                .execute(&mut **tx)
                .await
                .map_err(map_err(OP))?;
        }
        // At or below `forgotten`: processed before, its row compacted.
        Ok(InboxOutcome::Duplicate)
    }

    async fn commit(&self, tx: Self::Tx) -> Result<()> {
        tx.commit()
            .await
            .map_err(map_err("commit inbox transaction"))
    }

    async fn start_attempts(
        &self,
        consumer: &str,
        run: uuid::Uuid,
        ids: &[uuid::Uuid],
        alone: bool,
        now: DateTime<Utc>,
    ) -> Result<Vec<Attempt>> {
        const OP: &str = "start handler attempts";
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let run = run.hyphenated().to_string();
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err(OP))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let (unfinished, crashes): (bool, i64) = sqlx::query_as(START_ATTEMPT)
                .bind(consumer)
                .bind(id.hyphenated().to_string())
                .bind(&run)
                .bind(alone)
                .bind(to_ms(now))
                .fetch_one(&mut *tx)
                .await
                .map_err(map_err(OP))?;
            out.push(Attempt {
                unfinished,
                crashes: u32::try_from(crashes).unwrap_or(0),
            });
        }
        tx.commit().await.map_err(map_err(OP))?;
        Ok(out)
    }

    async fn finish_attempts(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        ids: &[uuid::Uuid],
    ) -> Result<()> {
        for id in ids {
            sqlx::query(FINISH_ATTEMPT)
                .bind(consumer)
                .bind(id.hyphenated().to_string())
                .execute(&mut **tx)
                .await
                .map_err(map_err("finish handler attempts"))?;
        }
        Ok(())
    }

    async fn is_recorded(&self, consumer: &str, id: uuid::Uuid) -> Result<bool> {
        sqlx::query_scalar(IS_RECORDED)
            .bind(consumer)
            .bind(id.hyphenated().to_string())
            .fetch_one(&self.pool)
            .await
            .map_err(map_err("read inbox"))
    }

    async fn dead_letter(&self, consumer: &str, dead: &DeadLetter) -> Result<()> {
        const OP: &str = "dead-letter consumed message";
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err(OP))?;
        let id = dead.message_id.map(|id| id.hyphenated().to_string());
        sqlx::query(INSERT_DEAD_LETTER)
            .bind(id.as_deref())
            .bind(format!("consumer:{consumer}"))
            .bind(dead.topic.as_str())
            .bind(dead.key.as_deref())
            .bind(dead.message_type.as_deref())
            .bind(dead.payload.as_slice())
            .bind(dead.envelope.as_deref())
            .bind(dead.error.as_str())
            .bind(i64::from(dead.attempts))
            .bind(to_ms(dead.dead_at))
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        // With the inbox row, a redelivery of this message is a duplicate
        // and is skipped instead of failing again.
        if let Some(id) = id {
            let stamp = dead.sequence();
            let (producer, partition, seq) = stamp_columns(stamp.as_ref());
            sqlx::query(INSERT_DEAD_INBOX)
                .bind(consumer)
                .bind(id)
                .bind(dead.topic.as_str())
                .bind(to_ms(dead.dead_at))
                .bind(producer)
                .bind(partition)
                .bind(seq)
                .execute(&mut *tx)
                .await
                .map_err(map_err(OP))?;
        }
        tx.commit().await.map_err(map_err(OP))
    }

    async fn redrives(&self, consumer: &str, limit: usize) -> Result<Vec<Redrive>> {
        const OP: &str = "read redrive queue";
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT seq, envelope FROM custody_redrive WHERE consumer = ?1 ORDER BY seq LIMIT ?2",
        )
        .bind(consumer)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err(OP))?;
        let (out, unreadable) = Redrive::read_queue(rows);
        for seq in unreadable {
            self.drop_redrive(seq).await?;
        }
        Ok(out)
    }

    async fn finish_redrive(&self, tx: &mut Self::Tx, seq: i64) -> Result<()> {
        sqlx::query("DELETE FROM custody_redrive WHERE seq = ?1")
            .bind(seq)
            .execute(&mut **tx)
            .await
            .map_err(map_err("finish redrive"))?;
        Ok(())
    }

    async fn drop_redrive(&self, seq: i64) -> Result<()> {
        sqlx::query("DELETE FROM custody_redrive WHERE seq = ?1")
            .bind(seq)
            .execute(&self.pool)
            .await
            .map_err(map_err("drop redrive"))?;
        Ok(())
    }

    async fn prune(&self, consumer: &str, older_than: DateTime<Utc>, limit: usize) -> Result<u64> {
        const OP: &str = "prune inbox";
        if limit == 0 {
            return Ok(0);
        }
        type Gone = (Option<String>, String, Option<i64>, Option<i64>);
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err(OP))?;
        let gone: Vec<Gone> = sqlx::query_as(PRUNE_INBOX)
            .bind(consumer)
            .bind(to_ms(older_than))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        let mut top: std::collections::BTreeMap<(String, String, i64), i64> = Default::default();
        for (producer, topic, partition, seq) in &gone {
            if let (Some(p), Some(part), Some(seq)) = (producer, partition, seq) {
                let e = top.entry((p.clone(), topic.clone(), *part)).or_insert(*seq);
                *e = (*e).max(*seq);
            }
        }
        for ((producer, topic, partition), seq) in top {
            sqlx::query(PRUNE_FORGET)
                .bind(consumer)
                .bind(producer)
                .bind(topic)
                .bind(partition)
                .bind(seq)
                .execute(&mut *tx)
                .await
                .map_err(map_err(OP))?;
        }
        tx.commit().await.map_err(map_err(OP))?;
        Ok(u64::try_from(gone.len()).unwrap_or(u64::MAX))
    }

    async fn progress(&self, consumer: &str) -> Result<Vec<PartitionProgress>> {
        const OP: &str = "read inbox progress";
        let rows = sqlx::query(PROGRESS)
            .bind(consumer)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err(OP))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let producer: String = row.try_get("producer").map_err(map_err(OP))?;
            let topic: String = row.try_get("topic").map_err(map_err(OP))?;
            let part: i64 = row.try_get("part").map_err(map_err(OP))?;
            let Ok(partition) = u32::try_from(part) else {
                continue; // not a partition custody wrote
            };
            let floor: i64 = row.try_get("floor").map_err(map_err(OP))?;
            let compacted: i64 = row.try_get("compacted").map_err(map_err(OP))?;
            let high: Option<i64> = row.try_get("high").map_err(map_err(OP))?;
            let above: i64 = row.try_get("above").map_err(map_err(OP))?;
            let earliest: Option<i64> = row.try_get("earliest").map_err(map_err(OP))?;
            out.push(PartitionProgress::from_parts(
                producer,
                topic,
                partition,
                count_u64(floor),
                high.map(count_u64),
                count_u64(above),
                earliest.and_then(DateTime::from_timestamp_millis),
                count_u64(compacted),
            ));
        }
        Ok(out)
    }

    async fn accept_gap(
        &self,
        consumer: &str,
        gap: &GapAcceptance,
        now: DateTime<Utc>,
    ) -> Result<AcceptedGap> {
        const OP: &str = "accept a sequence gap";
        let partition = i64::from(gap.partition);
        let last = match gap.range {
            GapRange::Numbers { last, .. } => i64::try_from(last).unwrap_or(i64::MAX),
            GapRange::StreamStart | GapRange::FirstHole => i64::MAX,
        };
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err(OP))?;
        sqlx::query(ENSURE_WATERMARK)
            .bind(consumer)
            .bind(&gap.producer)
            .bind(&gap.topic)
            .bind(partition)
            .bind(to_ms(now))
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        let (floor, has_history): (i64, bool) = sqlx::query_as(ACCEPT_READ)
            .bind(consumer)
            .bind(&gap.producer)
            .bind(&gap.topic)
            .bind(partition)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        let present: Vec<i64> = sqlx::query_scalar(ACCEPT_PRESENT)
            .bind(consumer)
            .bind(&gap.producer)
            .bind(&gap.topic)
            .bind(partition)
            .bind(floor)
            .bind(limit_i64(ACCEPT_MAX_ROWS))
            .bind(last)
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        let present: Vec<u64> = present.into_iter().map(count_u64).collect();
        if present.len() >= ACCEPT_MAX_ROWS && matches!(gap.range, GapRange::Numbers { .. }) {
            return Err(Error::store(
                "sqlite",
                OP,
                false,
                format!("more than {ACCEPT_MAX_ROWS} numbers are recorded in the range: accept a shorter range first"),
            ));
        }
        let plan = plan_acceptance(gap, count_u64(floor), has_history, &present)
            .map_err(|e| Error::store("sqlite", OP, false, e))?;
        let new_floor = i64::try_from(plan.new_floor).unwrap_or(i64::MAX);
        sqlx::query(ACCEPT_RAISE)
            .bind(consumer)
            .bind(&gap.producer)
            .bind(&gap.topic)
            .bind(partition)
            .bind(new_floor)
            .bind(to_ms(now))
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        sqlx::query(ACCEPT_AUDIT)
            .bind(consumer)
            .bind(&gap.producer)
            .bind(&gap.topic)
            .bind(partition)
            .bind(floor)
            .bind(new_floor)
            .bind(runs_text(&plan.missing))
            .bind(i64::try_from(plan.count()).unwrap_or(i64::MAX))
            .bind(&gap.by)
            .bind(&gap.reason)
            .bind(to_ms(now))
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        tx.commit().await.map_err(map_err(OP))?;
        Ok(plan)
    }

    async fn compact(
        &self,
        consumer: &str,
        keep_after: DateTime<Utc>,
        limit: usize,
    ) -> Result<Compaction> {
        const OP: &str = "compact inbox";
        let mut total = Compaction::default();
        if limit == 0 {
            return Ok(total);
        }
        let parts: Vec<(String, String, i64)> = sqlx::query_as(PARTITIONS)
            .bind(consumer)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err(OP))?;
        let now = to_ms(Utc::now());
        for (producer, topic, partition) in parts {
            // One short write transaction per partition: the floor read,
            // moved and the rows it covers deleted under one write lock, so
            // a concurrent `record` sees either the old floor and the rows
            // or the new floor.
            let mut tx = self
                .pool
                .begin_with("BEGIN IMMEDIATE")
                .await
                .map_err(map_err(OP))?;
            sqlx::query(ENSURE_WATERMARK)
                .bind(consumer)
                .bind(&producer)
                .bind(&topic)
                .bind(partition)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(map_err(OP))?;
            let floor: i64 = sqlx::query_scalar(READ_WATERMARK)
                .bind(consumer)
                .bind(&producer)
                .bind(&topic)
                .bind(partition)
                .fetch_one(&mut *tx)
                .await
                .map_err(map_err(OP))?;
            let above: Vec<i64> = sqlx::query_scalar(SEQS_ABOVE)
                .bind(consumer)
                .bind(&producer)
                .bind(&topic)
                .bind(partition)
                .bind(floor)
                .bind(limit_i64(limit))
                .fetch_all(&mut *tx)
                .await
                .map_err(map_err(OP))?;
            let old = count_u64(floor);
            let new = advance_floor(old, above.into_iter().map(count_u64));
            let new_i64 = i64::try_from(new).unwrap_or(i64::MAX);
            let gone: Vec<Option<i64>> = sqlx::query_scalar(DELETE_COMPACTED)
                .bind(consumer)
                .bind(&producer)
                .bind(&topic)
                .bind(partition)
                .bind(new_i64)
                .bind(to_ms(keep_after))
                .bind(limit_i64(limit))
                .fetch_all(&mut *tx)
                .await
                .map_err(map_err(OP))?;
            let deleted = u64::try_from(gone.len()).unwrap_or(u64::MAX);
            let highest_gone = gone.into_iter().flatten().max().unwrap_or(0);
            if new > old || deleted > 0 {
                sqlx::query(UPDATE_WATERMARK)
                    .bind(consumer)
                    .bind(&producer)
                    .bind(&topic)
                    .bind(partition)
                    .bind(new_i64)
                    .bind(i64::try_from(deleted).unwrap_or(i64::MAX))
                    .bind(now)
                    .bind(highest_gone)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err(OP))?;
            }
            tx.commit().await.map_err(map_err(OP))?;
            total.advanced += u64::from(new > old);
            total.deleted += deleted;
        }
        Ok(total)
    }
}

/// Inbox retention ([`InboxStore::prune`]): the oldest rows of one consumer
/// off the `custody_inbox_processed` index (migration 0003), at most `?3`
/// per statement (one short write lock). Rows of messages that still have a
/// dead letter stay, so a redelivery keeps being skipped until the dead
/// letter is redriven or purged. A numbered row above its partition's floor
/// (no watermark row: floor 0) stays too: it may be the only record of a
/// number past a gap, and deleting it would open a false gap that nothing
/// fills; compaction folds it once the gap closes. Returns the numbers
/// deleted: the highest per partition becomes its `forgotten` mark
/// ([`PRUNE_FORGET`]). Such rows are read again
/// by every prune but not counted against the limit.
const PRUNE_INBOX: &str = "DELETE FROM custody_inbox WHERE consumer = ?1 AND message_id IN ( \
     SELECT i.message_id FROM custody_inbox AS i \
     WHERE i.consumer = ?1 AND i.processed_at < ?2 \
       AND NOT EXISTS (SELECT 1 FROM custody_dead_letter AS d \
                       WHERE d.message_id = i.message_id AND d.origin = 'consumer:' || ?1) \
       AND (i.seq IS NULL OR i.seq <= COALESCE( \
             (SELECT w.floor FROM custody_inbox_watermark AS w \
              WHERE w.consumer = ?1 AND w.producer = i.producer AND w.topic = i.topic \
                AND w.producer_partition = i.producer_partition), 0)) \
     ORDER BY i.processed_at LIMIT ?3) \
     RETURNING producer, topic, producer_partition, seq";

/// After [`PRUNE_INBOX`], in its transaction: `?5` is the highest number
/// deleted in the partition (see [`RECORD`] on `forgotten`).
const PRUNE_FORGET: &str = "UPDATE custody_inbox_watermark SET forgotten = MAX(forgotten, ?5) \
     WHERE consumer = ?1 AND producer = ?2 AND topic = ?3 AND producer_partition = ?4";
