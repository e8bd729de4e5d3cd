//! The consumer's idempotent inbox and the dead-letter table.

use chrono::{DateTime, Utc};
use custody_core::sequence::{advance_floor, plan_acceptance, runs_text};
use custody_core::{
    AcceptedGap, Attempt, Compaction, DeadLetter, GapAcceptance, GapRange, InboxOutcome,
    InboxStore, Message, PartitionProgress, Redrive, Result, Sequence,
};
use sqlx::{PgPool, Postgres, Transaction};

use crate::error::db;
use crate::outbox::INSERT_DEAD_LETTER;

/// The PostgreSQL inbox: a consumer records each message id in its own
/// transaction, together with the handler's effects.
#[derive(Clone, Debug)]
pub struct PgInbox {
    pool: PgPool,
}

impl PgInbox {
    /// An inbox on `pool` (the consumer's database, migrated with [`crate::migrate`]).
    pub fn new(pool: PgPool) -> Self {
        PgInbox { pool }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

// The inbox insert, then for a numbered message its partition's floor (the
// floor row made with the partition's first message), in the function
// custody_inbox_record (migration 0007): one round trip, and still one
// statement after the other, each with its own snapshot. The order matters:
// a compaction that deleted this message's row and raised the floor either
// committed before the insert went ahead (then the floor read, with a newer
// snapshot, sees the floor) or had not yet read the row (then the row is the
// only record of the number and the compaction cannot raise the floor past
// it). Reading the floor first, or in the same statement, could see the
// floor from before a compaction that the insert then waited for, and take a
// compacted message as new. The insert's row lock (or the conflicting
// update's) serializes two deliveries of one message to one consumer: the
// second waits for the first transaction and then counts as a duplicate, or
// as new if the first rolled back. A row `custody dlq redrive` marked
// (duplicates = -1) counts as new once.
const RECORD: &str = "SELECT custody_inbox_record($1, $2, $3, $4, $5, $6, $7)";

// RECORD for several messages, in order, in one round trip (same function
// per message, migration 0007).
const RECORD_ALL: &str = "SELECT custody_inbox_record_all($1, $2, $3, $4, $5, $6, $7)";

// Every (producer, topic, partition) the consumer has a watermark row for
// (record creates it with the first numbered message of the partition), with
// the figures above its floor (count of DISTINCT numbers: a skip marker and
// an original the broker stored after all can share one).
const PROGRESS: &str = "\
SELECT w.producer, w.topic, w.producer_partition, w.floor, w.compacted,
       a.top, COALESCE(a.n, 0), a.earliest
FROM custody_inbox_watermark w
LEFT JOIN LATERAL (
    SELECT max(i.seq) AS top, count(DISTINCT i.seq) AS n, min(i.processed_at) AS earliest
    FROM custody_inbox i
    WHERE i.consumer = w.consumer AND i.producer = w.producer AND i.topic = w.topic
      AND i.producer_partition = w.producer_partition AND i.seq > w.floor) a ON true
WHERE w.consumer = $1
ORDER BY w.producer, w.topic, w.producer_partition";

const ENSURE_WATERMARK: &str = "\
INSERT INTO custody_inbox_watermark (consumer, producer, topic, producer_partition)
VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";

const WATERMARKS: &str = "\
SELECT producer, topic, producer_partition FROM custody_inbox_watermark WHERE consumer = $1";

const LOCK_WATERMARK: &str = "\
SELECT floor FROM custody_inbox_watermark
WHERE consumer = $1 AND producer = $2 AND topic = $3 AND producer_partition = $4 FOR UPDATE";

const SEQS_ABOVE: &str = "\
SELECT DISTINCT seq FROM custody_inbox
WHERE consumer = $1 AND producer = $2 AND topic = $3 AND producer_partition = $4 AND seq > $5
ORDER BY seq LIMIT $6";

// Bounded: at most $7 rows per statement, off custody_inbox_seq. Returns
// how many went and the highest number among them (RAISE_FLOOR keeps it as
// `forgotten`: above it every accounted-for number still has its rows).
const DELETE_COMPACTED: &str = "\
WITH gone AS (
    DELETE FROM custody_inbox
    WHERE consumer = $1 AND message_id = ANY(ARRAY(
        SELECT message_id FROM custody_inbox
        WHERE consumer = $1 AND producer = $2 AND topic = $3 AND producer_partition = $4
          AND seq IS NOT NULL AND seq <= $5 AND processed_at < $6
        LIMIT $7))
    RETURNING seq)
SELECT count(*), max(seq) FROM gone";

const RAISE_FLOOR: &str = "\
UPDATE custody_inbox_watermark
SET floor = $5, compacted = compacted + $6, updated_at = now(),
    forgotten = GREATEST(forgotten, COALESCE($7, 0))
WHERE consumer = $1 AND producer = $2 AND topic = $3 AND producer_partition = $4";

// Poison detection (migration 0010): one statement per group, committed on
// its own before the handlers run, so it survives a crash of the process.
// A run starting a message again (a retry, or alone after it was found in a
// group) counts nothing and keeps what the first start of the run found:
// the run before (`prev_run`, so the message stays "unfinished" for the
// whole run) and whether the run started it alone (once alone, a crash of
// the run is the message's). DISTINCT:
// ON CONFLICT DO UPDATE may not touch one row twice in a statement (a batch
// can hold a redelivery of the same message). The row lock of the upsert
// serializes two instances starting the same message; each sees the other's
// committed count.
const START_ATTEMPTS: &str = "\
INSERT INTO custody_inbox_attempt AS a (consumer, message_id, run, alone, started_at)
SELECT DISTINCT $1, id, $3::uuid, $4, $5::timestamptz FROM unnest($2::uuid[]) AS id
ON CONFLICT (consumer, message_id) DO UPDATE
SET crashes = a.crashes + CASE WHEN a.run <> EXCLUDED.run AND a.alone THEN 1 ELSE 0 END,
    prev_run = CASE WHEN a.run = EXCLUDED.run THEN a.prev_run ELSE a.run END,
    run = EXCLUDED.run,
    alone = CASE WHEN a.run = EXCLUDED.run THEN a.alone OR EXCLUDED.alone ELSE EXCLUDED.alone END,
    started_at = EXCLUDED.started_at
RETURNING message_id, COALESCE(prev_run <> run, false), crashes";

// Inside the handler's transaction: the attempts finish iff the effects commit.
const FINISH_ATTEMPTS: &str =
    "DELETE FROM custody_inbox_attempt WHERE consumer = $1 AND message_id = ANY($2)";

const IS_RECORDED: &str =
    "SELECT EXISTS (SELECT 1 FROM custody_inbox WHERE consumer = $1 AND message_id = $2)";
// InboxStore::accept_gap: the floor row (made if missing) locked against a
// concurrent compaction or acceptance, whether the partition has history,
// the numbers recorded above the floor up to the end of the range (bounded:
// at most $6 rows), then the raise and its audit record. A message of the
// range being recorded by a transaction not yet committed is not seen here:
// its record then finds the floor past it with its id unknown and
// dead-letters it (custody_inbox_record) rather than dropping it.
const ACCEPT_LOCK: &str = "\
SELECT w.floor,
       w.floor > 0 OR w.compacted > 0 OR EXISTS (
           SELECT 1 FROM custody_gap_accepted a
           WHERE a.consumer = w.consumer AND a.producer = w.producer AND a.topic = w.topic
             AND a.producer_partition = w.producer_partition)
FROM custody_inbox_watermark w
WHERE w.consumer = $1 AND w.producer = $2 AND w.topic = $3 AND w.producer_partition = $4
FOR UPDATE";

const ACCEPT_PRESENT: &str = "\
SELECT DISTINCT seq FROM custody_inbox
WHERE consumer = $1 AND producer = $2 AND topic = $3 AND producer_partition = $4
  AND seq > $5 AND seq <= $7
ORDER BY seq LIMIT $6";

const ACCEPT_RAISE: &str = "\
UPDATE custody_inbox_watermark SET floor = $5, updated_at = $6
WHERE consumer = $1 AND producer = $2 AND topic = $3 AND producer_partition = $4";

const ACCEPT_AUDIT: &str = "\
INSERT INTO custody_gap_accepted
    (consumer, producer, topic, producer_partition, old_floor, new_floor, numbers, count,
     accepted_by, reason, accepted_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// Most recorded numbers an acceptance reads between the floor and the end
/// of its range (more: accept a shorter range first).
pub const ACCEPT_MAX_ROWS: usize = 100_000;

impl InboxStore for PgInbox {
    type Tx = Transaction<'static, Postgres>;

    async fn begin(&self) -> Result<Self::Tx> {
        self.pool
            .begin()
            .await
            .map_err(db("begin inbox transaction"))
    }

    #[tracing::instrument(skip_all, fields(message_id = %message.id, topic = %message.topic, consumer))]
    async fn record(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        message: &Message,
        now: DateTime<Utc>,
    ) -> Result<InboxOutcome> {
        let sequence = Sequence::of(message);
        let (producer, partition, seq) = stamp_columns(sequence.as_ref());
        let new: Option<bool> = sqlx::query_scalar(RECORD)
            .bind(consumer)
            .bind(message.id)
            .bind(&message.topic)
            .bind(now)
            .bind(producer)
            .bind(partition)
            .bind(seq)
            .fetch_one(&mut **tx)
            .await
            .map_err(db("record in inbox"))?;
        self.settle(tx, consumer, message, new, now).await
    }

    #[tracing::instrument(skip_all, fields(count = messages.len(), consumer))]
    async fn record_all(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        messages: &[&Message],
        now: DateTime<Utc>,
    ) -> Result<Vec<InboxOutcome>> {
        match messages {
            [] => return Ok(Vec::new()),
            [one] => return Ok(vec![self.record(tx, consumer, one, now).await?]),
            _ => {}
        }
        let sequences: Vec<Option<Sequence>> = messages.iter().map(|m| Sequence::of(m)).collect();
        let mut ids = Vec::with_capacity(messages.len());
        let mut topics = Vec::with_capacity(messages.len());
        let mut producers = Vec::with_capacity(messages.len());
        let mut partitions = Vec::with_capacity(messages.len());
        let mut seqs = Vec::with_capacity(messages.len());
        for (m, s) in messages.iter().zip(&sequences) {
            let (producer, partition, seq) = stamp_columns(s.as_ref());
            ids.push(m.id);
            topics.push(m.topic.as_str());
            producers.push(producer);
            partitions.push(partition);
            seqs.push(seq);
        }
        let new: Vec<Option<bool>> = sqlx::query_scalar(RECORD_ALL)
            .bind(consumer)
            .bind(&ids)
            .bind(&topics)
            .bind(now)
            .bind(&producers)
            .bind(&partitions)
            .bind(&seqs)
            .fetch_one(&mut **tx)
            .await
            .map_err(db("record in inbox"))?;
        let mut out = Vec::with_capacity(new.len());
        for (m, n) in messages.iter().zip(new) {
            out.push(self.settle(tx, consumer, m, n, now).await?);
        }
        Ok(out)
    }

    async fn commit(&self, tx: Self::Tx) -> Result<()> {
        tx.commit().await.map_err(db("commit inbox transaction"))
    }

    async fn start_attempts(
        &self,
        consumer: &str,
        run: uuid::Uuid,
        ids: &[uuid::Uuid],
        alone: bool,
        now: DateTime<Utc>,
    ) -> Result<Vec<Attempt>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(uuid::Uuid, bool, i32)> = sqlx::query_as(START_ATTEMPTS)
            .bind(consumer)
            .bind(ids)
            .bind(run)
            .bind(alone)
            .bind(now)
            .fetch_all(&self.pool)
            .await
            .map_err(db("start handler attempts"))?;
        let found: std::collections::HashMap<uuid::Uuid, Attempt> = rows
            .into_iter()
            .map(|(id, unfinished, crashes)| {
                let crashes = u32::try_from(crashes).unwrap_or(0);
                (
                    id,
                    Attempt {
                        unfinished,
                        crashes,
                    },
                )
            })
            .collect();
        Ok(ids
            .iter()
            .map(|id| found.get(id).copied().unwrap_or_default())
            .collect())
    }

    async fn finish_attempts(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        ids: &[uuid::Uuid],
    ) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(FINISH_ATTEMPTS)
            .bind(consumer)
            .bind(ids)
            .execute(&mut **tx)
            .await
            .map_err(db("finish handler attempts"))?;
        Ok(())
    }

    async fn is_recorded(&self, consumer: &str, id: uuid::Uuid) -> Result<bool> {
        sqlx::query_scalar(IS_RECORDED)
            .bind(consumer)
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .map_err(db("read inbox"))
    }

    async fn dead_letter(&self, consumer: &str, dead: &DeadLetter) -> Result<()> {
        const OP: &str = "dead letter (consumer)";
        let mut tx = self.pool.begin().await.map_err(db(OP))?;
        let origin = format!("consumer:{consumer}");
        sqlx::query(INSERT_DEAD_LETTER)
            .bind(dead.message_id)
            .bind(&origin)
            .bind(&dead.topic)
            .bind(&dead.key)
            .bind(&dead.message_type)
            .bind(&dead.payload)
            .bind(&dead.envelope)
            .bind(&dead.error)
            .bind(i32::try_from(dead.attempts).unwrap_or(i32::MAX))
            .bind(dead.dead_at)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        if let Some(id) = dead.message_id {
            // so a redelivery is recognised and skipped, and its number (if
            // any) counts as accounted for, not as a gap
            let sequence = dead.sequence();
            let (producer, partition, seq) = stamp_columns(sequence.as_ref());
            sqlx::query(
                "INSERT INTO custody_inbox
                     (consumer, message_id, topic, processed_at, producer, producer_partition, seq)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (consumer, message_id)
                 DO UPDATE SET duplicates = GREATEST(custody_inbox.duplicates, 0)",
            )
            .bind(consumer)
            .bind(id)
            .bind(&dead.topic)
            .bind(dead.dead_at)
            .bind(producer)
            .bind(partition)
            .bind(seq)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
            if let (Some(producer), Some(partition)) = (producer, partition) {
                sqlx::query(ENSURE_WATERMARK)
                    .bind(consumer)
                    .bind(producer)
                    .bind(&dead.topic)
                    .bind(partition)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(OP))?;
            }
        }
        tx.commit().await.map_err(db(OP))
    }

    async fn redrives(&self, consumer: &str, limit: usize) -> Result<Vec<Redrive>> {
        const OP: &str = "read redrive queue";
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT seq, envelope FROM custody_redrive WHERE consumer = $1 ORDER BY seq LIMIT $2",
        )
        .bind(consumer)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(db(OP))?;
        let (out, unreadable) = Redrive::read_queue(rows);
        for seq in unreadable {
            self.drop_redrive(seq).await?;
        }
        Ok(out)
    }

    async fn finish_redrive(&self, tx: &mut Self::Tx, seq: i64) -> Result<()> {
        sqlx::query("DELETE FROM custody_redrive WHERE seq = $1")
            .bind(seq)
            .execute(&mut **tx)
            .await
            .map_err(db("finish redrive"))?;
        Ok(())
    }

    async fn drop_redrive(&self, seq: i64) -> Result<()> {
        sqlx::query("DELETE FROM custody_redrive WHERE seq = $1")
            .bind(seq)
            .execute(&self.pool)
            .await
            .map_err(db("drop redrive"))?;
        Ok(())
    }

    async fn prune(&self, consumer: &str, older_than: DateTime<Utc>, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let done: i64 = sqlx::query_scalar(PRUNE_INBOX)
            .bind(consumer)
            .bind(older_than)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_one(&self.pool)
            .await
            .map_err(db("prune inbox"))?;
        Ok(u64::try_from(done).unwrap_or(0))
    }

    async fn progress(&self, consumer: &str) -> Result<Vec<PartitionProgress>> {
        type Row = (
            String,
            String,
            i32,
            i64,
            i64,
            Option<i64>,
            i64,
            Option<DateTime<Utc>>,
        );
        let rows: Vec<Row> = sqlx::query_as(PROGRESS)
            .bind(consumer)
            .fetch_all(&self.pool)
            .await
            .map_err(db("read inbox progress"))?;
        Ok(rows
            .into_iter()
            .map(
                |(producer, topic, partition, floor, compacted, top, n, earliest)| {
                    PartitionProgress::from_parts(
                        producer,
                        topic,
                        u32::try_from(partition).unwrap_or(0),
                        u64::try_from(floor).unwrap_or(0),
                        top.and_then(|t| u64::try_from(t).ok()),
                        u64::try_from(n).unwrap_or(0),
                        earliest,
                        u64::try_from(compacted).unwrap_or(0),
                    )
                },
            )
            .collect())
    }

    async fn accept_gap(
        &self,
        consumer: &str,
        gap: &GapAcceptance,
        now: DateTime<Utc>,
    ) -> Result<AcceptedGap> {
        const OP: &str = "accept a sequence gap";
        let partition = i32::try_from(gap.partition).map_err(|_| {
            custody_core::Error::store(
                "postgres",
                OP,
                false,
                format!("partition {} is out of range", gap.partition),
            )
        })?;
        let last = match gap.range {
            GapRange::Numbers { last, .. } => i64::try_from(last).unwrap_or(i64::MAX),
            GapRange::StreamStart | GapRange::FirstHole => i64::MAX,
        };
        let mut tx = self.pool.begin().await.map_err(db(OP))?;
        sqlx::query(ENSURE_WATERMARK)
            .bind(consumer)
            .bind(&gap.producer)
            .bind(&gap.topic)
            .bind(partition)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        let (floor, has_history): (i64, bool) = sqlx::query_as(ACCEPT_LOCK)
            .bind(consumer)
            .bind(&gap.producer)
            .bind(&gap.topic)
            .bind(partition)
            .fetch_one(&mut *tx)
            .await
            .map_err(db(OP))?;
        let present: Vec<i64> = sqlx::query_scalar(ACCEPT_PRESENT)
            .bind(consumer)
            .bind(&gap.producer)
            .bind(&gap.topic)
            .bind(partition)
            .bind(floor)
            .bind(i64::try_from(ACCEPT_MAX_ROWS).unwrap_or(i64::MAX))
            .bind(last)
            .fetch_all(&mut *tx)
            .await
            .map_err(db(OP))?;
        let present: Vec<u64> = present
            .into_iter()
            .filter_map(|s| u64::try_from(s).ok())
            .collect();
        if present.len() >= ACCEPT_MAX_ROWS && matches!(gap.range, GapRange::Numbers { .. }) {
            return Err(custody_core::Error::store(
                "postgres",
                OP,
                false,
                format!("more than {ACCEPT_MAX_ROWS} numbers are recorded in the range: accept a shorter range first"),
            ));
        }
        let plan = plan_acceptance(
            gap,
            u64::try_from(floor).unwrap_or(0),
            has_history,
            &present,
        )
        .map_err(|e| custody_core::Error::store("postgres", OP, false, e))?;
        let new_floor = i64::try_from(plan.new_floor).unwrap_or(i64::MAX);
        sqlx::query(ACCEPT_RAISE)
            .bind(consumer)
            .bind(&gap.producer)
            .bind(&gap.topic)
            .bind(partition)
            .bind(new_floor)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
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
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        tx.commit().await.map_err(db(OP))?;
        Ok(plan)
    }

    async fn compact(
        &self,
        consumer: &str,
        keep_after: DateTime<Utc>,
        limit: usize,
    ) -> Result<Compaction> {
        const OP: &str = "compact inbox";
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        let mut out = Compaction::default();
        // record() made a watermark row for every numbered partition: list
        // them (not the progress aggregate, which the caller reads anyway)
        let parts: Vec<(String, String, i32)> = sqlx::query_as(WATERMARKS)
            .bind(consumer)
            .fetch_all(&self.pool)
            .await
            .map_err(db(OP))?;
        for (producer, topic, partition) in parts {
            let mut tx = self.pool.begin().await.map_err(db(OP))?;
            let floor: i64 = sqlx::query_scalar(LOCK_WATERMARK)
                .bind(consumer)
                .bind(&producer)
                .bind(&topic)
                .bind(partition)
                .fetch_one(&mut *tx)
                .await
                .map_err(db(OP))?;
            let above: Vec<i64> = sqlx::query_scalar(SEQS_ABOVE)
                .bind(consumer)
                .bind(&producer)
                .bind(&topic)
                .bind(partition)
                .bind(floor)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await
                .map_err(db(OP))?;
            let old = u64::try_from(floor).unwrap_or(0);
            let new = advance_floor(old, above.iter().filter_map(|s| u64::try_from(*s).ok()));
            let new_floor = i64::try_from(new).unwrap_or(floor);
            let (deleted, highest_deleted): (i64, Option<i64>) = sqlx::query_as(DELETE_COMPACTED)
                .bind(consumer)
                .bind(&producer)
                .bind(&topic)
                .bind(partition)
                .bind(new_floor)
                .bind(keep_after)
                .bind(limit)
                .fetch_one(&mut *tx)
                .await
                .map_err(db(OP))?;
            let deleted = u64::try_from(deleted).unwrap_or(0);
            if new > old || deleted > 0 {
                sqlx::query(RAISE_FLOOR)
                    .bind(consumer)
                    .bind(&producer)
                    .bind(&topic)
                    .bind(partition)
                    .bind(new_floor)
                    .bind(i64::try_from(deleted).unwrap_or(i64::MAX))
                    .bind(highest_deleted)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(OP))?;
            }
            tx.commit().await.map_err(db(OP))?;
            out.advanced += u64::from(new > old);
            out.deleted += deleted;
        }
        Ok(out)
    }
}

// A numbered message at or below its floor whose id was never recorded
// (custody_inbox_record returned NULL): dead-lettered in the handler's
// transaction, once per id (a replay of it finds the letter and adds none).
const DEAD_LETTER_UNSEEN: &str = "\
INSERT INTO custody_dead_letter
    (message_id, origin, topic, msg_key, message_type, payload, envelope, error, attempts, dead_at)
SELECT $1, $2, $3, $4, $5, $6, $7, $8, 0, $9
WHERE NOT EXISTS (SELECT 1 FROM custody_dead_letter WHERE message_id = $1 AND origin = $2)";

impl PgInbox {
    /// The outcome of what custody_inbox_record returned for `message`:
    /// true = new, false = duplicate, NULL = a number at or below the floor
    /// whose id was never recorded, which is dead-lettered here (never
    /// dropped) and reported as a duplicate (nothing to apply).
    async fn settle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        consumer: &str,
        message: &Message,
        new: Option<bool>,
        now: DateTime<Utc>,
    ) -> Result<InboxOutcome> {
        match new {
            Some(true) => Ok(InboxOutcome::New),
            Some(false) => Ok(InboxOutcome::Duplicate),
            None => {
                let error = unseen_reason(message);
                tracing::warn!(consumer, message_id = %message.id, topic = %message.topic, "{error}");
                let envelope = serde_json::to_string(message).ok();
                sqlx::query(DEAD_LETTER_UNSEEN)
                    .bind(message.id)
                    .bind(format!("consumer:{consumer}"))
                    .bind(&message.topic)
                    .bind(&message.key)
                    .bind(&message.message_type)
                    .bind(&message.payload)
                    .bind(envelope)
                    .bind(&error)
                    .bind(now)
                    .execute(&mut **tx)
                    .await
                    .map_err(db("dead-letter a reused sequence number"))?;
                Ok(InboxOutcome::Duplicate)
            }
        }
    }
}

/// Why a numbered message at or below the floor with an unknown id is
/// dead-lettered (shared wording with the SQLite inbox).
pub(crate) fn unseen_reason(message: &Message) -> String {
    custody_core::sequence::unseen_number_reason(message)
}

fn stamp_columns(s: Option<&Sequence>) -> (Option<&str>, Option<i32>, Option<i64>) {
    match s.and_then(|s| {
        Some((
            s.producer.as_str(),
            i32::try_from(s.partition).ok()?,
            i64::try_from(s.seq).ok()?,
        ))
    }) {
        Some((p, q, n)) => (Some(p), Some(q), Some(n)),
        None => (None, None, None),
    }
}

// Inbox retention (InboxStore::prune): one consumer's oldest rows off the
// custody_inbox_processed index (migration 0003), at most $3 per statement.
// Rows of messages that still have a dead letter stay, so a redelivery keeps
// being skipped until the letter is redriven or purged. SKIP LOCKED: a row a
// consumer transaction is updating (a duplicate being counted) is left for
// the next round instead of waited on. A numbered row above its partition's
// floor stays: it is the only record of a number past a gap, and deleting it
// would open a false gap (compaction folds it once the gap closes). The
// highest number deleted per partition becomes its `forgotten` mark in the
// same statement (custody_inbox_record: above it, an unknown id at or below
// the floor was never recorded).
const PRUNE_INBOX: &str = "\
WITH gone AS (
DELETE FROM custody_inbox
WHERE consumer = $1 AND message_id = ANY(ARRAY(
    SELECT i.message_id FROM custody_inbox i
    WHERE i.consumer = $1 AND i.processed_at < $2
      AND NOT EXISTS (SELECT 1 FROM custody_dead_letter d
                      WHERE d.message_id = i.message_id AND d.origin = 'consumer:' || $1)
      AND (i.seq IS NULL OR i.seq <= COALESCE(
          (SELECT w.floor FROM custody_inbox_watermark w
           WHERE w.consumer = $1 AND w.producer = i.producer AND w.topic = i.topic
             AND w.producer_partition = i.producer_partition), 0))
    ORDER BY i.processed_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED))
    RETURNING producer, topic, producer_partition, seq),
bump AS (
    UPDATE custody_inbox_watermark w SET forgotten = GREATEST(w.forgotten, g.top)
    FROM (SELECT producer, topic, producer_partition, max(seq) AS top FROM gone
          WHERE seq IS NOT NULL GROUP BY producer, topic, producer_partition) g
    WHERE w.consumer = $1 AND w.producer = g.producer AND w.topic = g.topic
      AND w.producer_partition = g.producer_partition)
SELECT count(*) FROM gone";
