//! Reading and repairing history: reconciliation (producer and consumer
//! sides), message status, dead-letter operations, embedded-reader rewind.
//! See docs/OPERATIONS.md.

use chrono::{DateTime, Utc};
use custody_core::admin::{
    redrive_target, RedriveOutcome, RedriveStep, RedriveTarget, SKIP_NO_SUCH, SKIP_OUTBOX_ROW_GONE,
};
use custody_core::{
    ConsumerSide, DeadLetter, DeadLetterInfo, IdRange, InboxStore, MessageStatus, NumberedRow,
    PartitionProgress, ProcessedHistory, ProducerSide, RedriveInfo, Result, SentHistory,
    SequenceHead,
};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::error::db;
use crate::outbox::journal_number;
use crate::{PgInbox, PgOutbox};

// UUIDs compare bytewise: an id range is a range of the UNIQUE (id) index.
// One row per slice (an array), not one row per id: a million ids cost a
// few dozen round trips and no per-row decoding. No ORDER BY / LIMIT: the
// engine bounds slices by id range, so no plan ever sorts a window (with
// stale statistics PostgreSQL would otherwise pick a bitmap scan + sort of
// the whole range for every page). `(topic || '')` keeps the planner off
// the (topic, txid, position) index, which would read every row of the
// topic for each slice.
const SENT_IDS: &str = "\
SELECT COALESCE(array_agg(id), '{}') FROM custody_outbox
WHERE id >= $1 AND id < $2 AND (topic || '') = $3 AND status <> 2";
const SENT_DEAD: &str = "\
SELECT id, COALESCE(last_error, '') FROM custody_outbox
WHERE id >= $1 AND id < $2 AND topic = $3 AND status = 2 ORDER BY id";
// Only published rows: a pending one is on its way already, a dead one is
// accounted for (redrive it instead).
const REPUBLISH: &str = "\
UPDATE custody_outbox SET status = 0, attempts = 0, retry_at = NULL, last_error = NULL,
    published_at = NULL, republish = republish + 1
WHERE id = ANY($1) AND status = 1";

impl SentHistory for PgOutbox {
    async fn sent_ids(&self, topic: &str, range: IdRange) -> Result<Vec<Uuid>> {
        sqlx::query_scalar(SENT_IDS)
            .bind(range.from)
            .bind(range.to)
            .bind(topic)
            .fetch_one(self.pool())
            .await
            .map_err(db("read outbox history"))
    }

    async fn sent_dead(&self, topic: &str, range: IdRange) -> Result<Vec<(Uuid, String)>> {
        sqlx::query_as(SENT_DEAD)
            .bind(range.from)
            .bind(range.to)
            .bind(topic)
            .fetch_all(self.pool())
            .await
            .map_err(db("read dead outbox rows"))
    }

    async fn republish(&self, ids: &[Uuid]) -> Result<u64> {
        let mut tx = self
            .pool()
            .begin()
            .await
            .map_err(db("republish outbox rows"))?;
        let done = sqlx::query(REPUBLISH)
            .bind(ids)
            .execute(&mut *tx)
            .await
            .map_err(db("republish outbox rows"))?;
        // wake relays (NOTIFY is delivered at commit)
        sqlx::query("SELECT pg_notify('custody_outbox', '')")
            .execute(&mut *tx)
            .await
            .map_err(db("republish outbox rows"))?;
        tx.commit().await.map_err(db("republish outbox rows"))?;
        Ok(done.rows_affected())
    }

    async fn sequence_heads(&self) -> Result<Option<(String, Vec<SequenceHead>)>> {
        // The stored id, read only (OutboxStore::producer_id may renew it
        // after a restore or clone, and a check never writes to what it
        // checks): the id the published numbers were given under.
        let producer: Option<String> =
            sqlx::query_scalar("SELECT id FROM custody_producer ORDER BY created_at LIMIT 1")
                .fetch_optional(self.pool())
                .await
                .map_err(db("read producer id"))?;
        let Some(producer) = producer else {
            return Ok(None);
        };
        let rows: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT topic, partition, next_seq - 1 FROM custody_sequence
             WHERE next_seq > 1 ORDER BY topic, partition",
        )
        .fetch_all(self.pool())
        .await
        .map_err(db("read sequence heads"))?;
        let heads = rows
            .into_iter()
            .map(|(topic, partition, last)| SequenceHead {
                topic,
                partition: u32::try_from(partition).unwrap_or(0),
                last: u64::try_from(last).unwrap_or(0),
            })
            .collect();
        Ok(Some((producer, heads)))
    }

    async fn numbered(
        &self,
        topic: &str,
        partition: u32,
        seqs: &[u64],
    ) -> Result<Vec<NumberedRow>> {
        let seqs: Vec<i64> = seqs.iter().filter_map(|s| i64::try_from(*s).ok()).collect();
        let rows: Vec<(i64, Uuid, i16, Option<DateTime<Utc>>)> = sqlx::query_as(
            // rows carrying their number, and rows in flight whose number
            // is still only in the sequence journal (e.g. their relay
            // crashed between publishing and marking)
            "SELECT seq, id, status, published_at FROM (
                 SELECT seq, id, status, published_at, position FROM custody_outbox
                 WHERE (topic || '') = $1 AND partition = $2 AND seq = ANY($3)
                 UNION ALL
                 SELECT u.seq, o.id, o.status, o.published_at, o.position
                 FROM custody_sequence_block b
                 CROSS JOIN LATERAL unnest(b.positions, b.seqs) AS u(pos, seq)
                 JOIN custody_outbox o ON o.position = u.pos AND o.seq IS NULL
                 WHERE b.topic = $1 AND b.partition = $2 AND u.seq = ANY($3)) AS n
             ORDER BY seq, position",
        )
        .bind(topic)
        .bind(i32::try_from(partition).unwrap_or(i32::MAX))
        .bind(&seqs)
        .fetch_all(self.pool())
        .await
        .map_err(db("read numbered outbox rows"))?;
        Ok(rows
            .into_iter()
            .map(|(seq, id, status, published_at)| NumberedRow {
                seq: u64::try_from(seq).unwrap_or(0),
                id,
                status: status_name(status),
                published_at,
            })
            .collect())
    }
}

const PROCESSED_IDS: &str = "\
SELECT COALESCE(array_agg(message_id), '{}') FROM custody_inbox
WHERE consumer = $1 AND message_id >= $2 AND message_id < $3 AND topic = $4
  AND duplicates >= 0";
// (duplicates = -1: redriven, not processed again yet; listed by REDRIVING)
const PROCESSED_DEAD: &str = "\
SELECT message_id, error FROM custody_dead_letter
WHERE origin = 'consumer:' || $1 AND topic = $2 AND message_id >= $3 AND message_id < $4
ORDER BY message_id";
const REDRIVING: &str = "\
SELECT message_id FROM custody_redrive
WHERE consumer = $1 AND topic = $2 AND message_id >= $3 AND message_id < $4 ORDER BY message_id";

impl ProcessedHistory for PgInbox {
    async fn processed_ids(
        &self,
        consumer: &str,
        topic: &str,
        range: IdRange,
    ) -> Result<Vec<Uuid>> {
        sqlx::query_scalar(PROCESSED_IDS)
            .bind(consumer)
            .bind(range.from)
            .bind(range.to)
            .bind(topic)
            .fetch_one(self.pool())
            .await
            .map_err(db("read inbox history"))
    }

    async fn processed_dead(
        &self,
        consumer: &str,
        topic: &str,
        range: IdRange,
    ) -> Result<Vec<(Uuid, String)>> {
        sqlx::query_as(PROCESSED_DEAD)
            .bind(consumer)
            .bind(topic)
            .bind(range.from)
            .bind(range.to)
            .fetch_all(self.pool())
            .await
            .map_err(db("read consumer dead letters"))
    }

    async fn redriving(&self, consumer: &str, topic: &str, range: IdRange) -> Result<Vec<Uuid>> {
        sqlx::query_scalar(REDRIVING)
            .bind(consumer)
            .bind(topic)
            .bind(range.from)
            .bind(range.to)
            .fetch_all(self.pool())
            .await
            .map_err(db("read redrive queue"))
    }

    async fn sequence_progress(&self, consumer: &str) -> Result<Vec<PartitionProgress>> {
        InboxStore::progress(self, consumer).await
    }

    async fn numbers_above_floor(
        &self,
        consumer: &str,
        p: &PartitionProgress,
        limit: usize,
    ) -> Result<Vec<(u64, DateTime<Utc>)>> {
        let rows: Vec<(i64, DateTime<Utc>)> = sqlx::query_as(
            "SELECT seq, min(processed_at) FROM custody_inbox
             WHERE consumer = $1 AND producer = $2 AND topic = $3 AND producer_partition = $4
               AND seq > $5
             GROUP BY seq ORDER BY seq LIMIT $6",
        )
        .bind(consumer)
        .bind(&p.producer)
        .bind(&p.topic)
        .bind(i32::try_from(p.partition).unwrap_or(i32::MAX))
        .bind(i64::try_from(p.floor).unwrap_or(i64::MAX))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(db("read inbox numbers"))?;
        Ok(rows
            .into_iter()
            .map(|(seq, at)| (u64::try_from(seq).unwrap_or(0), at))
            .collect())
    }
}

fn status_name(s: i16) -> String {
    match s {
        0 => "pending",
        1 => "published",
        2 => "dead",
        _ => "unknown",
    }
    .to_owned()
}

/// Everything this database's custody tables know about message `id`: its
/// outbox row (producer), inbox rows (consumers), dead letters, redrives.
pub async fn status(pool: &PgPool, id: Uuid) -> Result<MessageStatus> {
    const OP: &str = "read message status";
    let mut st = MessageStatus::new(id);
    // the number is in the row once published (or failed, or dead), in the
    // sequence journal while the row is in flight
    let row = sqlx::query(concat!(
        "SELECT topic, message_type, msg_key, position, created_at, enqueued_at, status, attempts,
                retry_at, last_error, published_at, publish_ref, republish,
                COALESCE(seq, (",
        journal_number!(),
        ")) AS seq
         FROM custody_outbox o WHERE id = $1",
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(db(OP))?;
    let read = |r: &sqlx::postgres::PgRow| -> std::result::Result<ProducerSide, sqlx::Error> {
        Ok(ProducerSide {
            topic: r.try_get("topic")?,
            message_type: r.try_get("message_type")?,
            key: r.try_get("msg_key")?,
            position: r.try_get("position")?,
            created_at: r.try_get("created_at")?,
            enqueued_at: r.try_get("enqueued_at")?,
            status: status_name(r.try_get("status")?),
            attempts: u32::try_from(r.try_get::<i32, _>("attempts")?).unwrap_or(0),
            retry_at: r.try_get("retry_at")?,
            last_error: r.try_get("last_error")?,
            published_at: r.try_get("published_at")?,
            publish_ref: r.try_get("publish_ref")?,
            republished: u32::try_from(r.try_get::<i32, _>("republish")?).unwrap_or(0),
            sequence: r
                .try_get::<Option<i64>, _>("seq")?
                .and_then(|s| u64::try_from(s).ok()),
        })
    };
    if let Some(r) = row {
        st.producer = Some(read(&r).map_err(db(OP))?);
    }
    let dead = sqlx::query(
        "SELECT origin, error, attempts, dead_at FROM custody_dead_letter WHERE message_id = $1 ORDER BY seq",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .map_err(db(OP))?;
    for r in &dead {
        st.dead.push(DeadLetterInfo {
            origin: r.try_get("origin").map_err(db(OP))?,
            error: r.try_get("error").map_err(db(OP))?,
            attempts: u32::try_from(r.try_get::<i32, _>("attempts").map_err(db(OP))?).unwrap_or(0),
            dead_at: r.try_get("dead_at").map_err(db(OP))?,
        });
    }
    let inbox = sqlx::query(
        "SELECT consumer, processed_at, duplicates FROM custody_inbox
         WHERE message_id = $1 AND duplicates >= 0 ORDER BY consumer",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .map_err(db(OP))?;
    for r in &inbox {
        let consumer: String = r.try_get("consumer").map_err(db(OP))?;
        let origin = format!("consumer:{consumer}");
        st.consumers.push(ConsumerSide {
            dead: st.dead.iter().any(|d| d.origin == origin),
            consumer,
            processed_at: r.try_get("processed_at").map_err(db(OP))?,
            duplicates: u32::try_from(r.try_get::<i32, _>("duplicates").map_err(db(OP))?)
                .unwrap_or(0),
        });
    }
    let redrives = sqlx::query(
        "SELECT consumer, redriven_at FROM custody_redrive WHERE message_id = $1 ORDER BY seq",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .map_err(db(OP))?;
    for r in &redrives {
        st.redriving.push(RedriveInfo {
            consumer: r.try_get("consumer").map_err(db(OP))?,
            redriven_at: r.try_get("redriven_at").map_err(db(OP))?,
        });
    }
    Ok(st)
}

/// Every dead letter with its sequence number (the handle of `redrive` and
/// `purge`), oldest first.
pub async fn dead_letter_rows(pool: &PgPool) -> Result<Vec<(i64, DeadLetter)>> {
    const OP: &str = "list dead letters";
    let rows = sqlx::query(
        "SELECT seq, message_id, origin, topic, msg_key, message_type, payload, envelope, error, attempts, dead_at
         FROM custody_dead_letter ORDER BY seq",
    )
    .fetch_all(pool)
    .await
    .map_err(db(OP))?;
    rows.iter()
        .map(|r| {
            let attempts: i32 = r.try_get(9)?;
            Ok((
                r.try_get(0)?,
                DeadLetter {
                    message_id: r.try_get(1)?,
                    origin: r.try_get(2)?,
                    topic: r.try_get(3)?,
                    key: r.try_get(4)?,
                    message_type: r.try_get(5)?,
                    payload: r.try_get(6)?,
                    envelope: r.try_get(7)?,
                    error: r.try_get(8)?,
                    attempts: u32::try_from(attempts).unwrap_or(0),
                    dead_at: r.try_get(10)?,
                },
            ))
        })
        .collect::<std::result::Result<Vec<_>, sqlx::Error>>()
        .map_err(db(OP))
}

/// Send dead letters `seqs` back, each in its own transaction, as
/// [`redrive_target`] decides:
///
/// - a consumer's (`consumer:<name>`): its stored envelope goes to
///   `custody_redrive`, the dead letter is deleted and the consumer's inbox
///   row marked; the consumer engine processes it once through the inbox;
/// - the relay's: the outbox row goes back to pending (attempts 0, marked as
///   a republish) and the dead letter is deleted.
///
/// A dead letter without an envelope (a malformed message) or whose outbox
/// row was pruned is skipped, with the reason.
pub async fn redrive(pool: &PgPool, seqs: &[i64], now: DateTime<Utc>) -> Result<RedriveOutcome> {
    let mut out = RedriveOutcome::default();
    for &seq in seqs {
        out.add(seq, redrive_one(pool, seq, now).await?);
    }
    Ok(out)
}

async fn redrive_one(pool: &PgPool, seq: i64, now: DateTime<Utc>) -> Result<RedriveStep> {
    const OP: &str = "redrive dead letter";
    let mut tx = pool.begin().await.map_err(db(OP))?;
    // FOR UPDATE: two operators redriving the same letter queue it once.
    let row = sqlx::query(
        "SELECT message_id, origin, topic, envelope FROM custody_dead_letter WHERE seq = $1 FOR UPDATE",
    )
    .bind(seq)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db(OP))?;
    let Some(row) = row else {
        return Ok(RedriveStep::Skipped(SKIP_NO_SUCH));
    };
    let id: Option<Uuid> = row.try_get("message_id").map_err(db(OP))?;
    let origin: String = row.try_get("origin").map_err(db(OP))?;
    let topic: String = row.try_get("topic").map_err(db(OP))?;
    let envelope: Option<String> = row.try_get("envelope").map_err(db(OP))?;
    let step = match redrive_target(&origin, id, envelope.as_deref()) {
        RedriveTarget::Skip(why) => return Ok(RedriveStep::Skipped(why)),
        RedriveTarget::Consumer {
            consumer,
            id,
            envelope,
        } => {
            sqlx::query(
                "INSERT INTO custody_redrive (consumer, message_id, topic, envelope, redriven_at)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (consumer, message_id) DO NOTHING",
            )
            .bind(consumer)
            .bind(id)
            .bind(&topic)
            .bind(envelope)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
            // Not deleted: marked (duplicates = -1) so the consumer's next
            // record of the message counts as new once, while a numbered
            // row keeps its number accounted for (no gap opens).
            sqlx::query(
                "UPDATE custody_inbox SET duplicates = -1 WHERE consumer = $1 AND message_id = $2",
            )
            .bind(consumer)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
            RedriveStep::ToConsumer
        }
        RedriveTarget::Relay { id } => {
            // seq = NULL: the skip marker left in its place accounted for
            // its old number; the relay gives it a new one
            // (and out of the sequence journal, whose entry would give it
            // the old number back)
            let reset: i64 = sqlx::query_scalar(
                "WITH reset AS (
                     UPDATE custody_outbox SET status = 0, attempts = 0, retry_at = NULL,
                         last_error = NULL, republish = republish + 1, seq = NULL
                     WHERE id = $1 AND status = 2
                     RETURNING position, partition),
                 journal AS (
                     UPDATE custody_sequence_block b
                     SET positions = array_replace(b.positions, r.position, 0)
                     FROM reset r
                     WHERE b.partition = r.partition AND b.first_pos <= r.position
                       AND b.last_pos >= r.position AND r.position = ANY(b.positions))
                 SELECT count(*) FROM reset",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db(OP))?;
            if reset == 0 {
                return Ok(RedriveStep::Skipped(SKIP_OUTBOX_ROW_GONE));
            }
            sqlx::query("SELECT pg_notify('custody_outbox', '')")
                .execute(&mut *tx)
                .await
                .map_err(db(OP))?;
            RedriveStep::ToRelay
        }
    };
    sqlx::query("DELETE FROM custody_dead_letter WHERE seq = $1")
        .bind(seq)
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;
    tx.commit().await.map_err(db(OP))?;
    Ok(step)
}

/// Delete dead letters `seqs`. A consumer's inbox row stays, so a late
/// redelivery of the message is still skipped. Returns how many were deleted.
pub async fn purge(pool: &PgPool, seqs: &[i64]) -> Result<u64> {
    let done = sqlx::query("DELETE FROM custody_dead_letter WHERE seq = ANY($1)")
        .bind(seqs)
        .execute(pool)
        .await
        .map_err(db("purge dead letters"))?;
    Ok(done.rows_affected())
}

/// Repair for the embedded transport: move `subscription`'s checkpoint back
/// to just before the earliest outbox row of `ids` in the readers'
/// (txid, position) order, so the reader delivers them again (its
/// consumer's inbox skips the ones it has). Never moves it forward. Returns
/// the new checkpoint position, or `None` when nothing needed rewinding.
/// Stop the consumer first: a running reader keeps its in-memory cursor and
/// its next acknowledgement moves the checkpoint past the rewind again.
pub async fn rewind_checkpoint(
    pool: &PgPool,
    subscription: &str,
    ids: &[Uuid],
) -> Result<Option<i64>> {
    const OP: &str = "rewind checkpoint";
    let done: Option<i64> = sqlx::query_scalar(
        "WITH first AS (
             SELECT txid, position FROM custody_outbox WHERE id = ANY($2)
             ORDER BY txid, position LIMIT 1)
         UPDATE custody_checkpoint c
         SET txid = first.txid, position = first.position - 1, updated_at = now()
         FROM first
         WHERE c.subscription = $1 AND (c.txid, c.position) >= (first.txid, first.position)
         RETURNING c.position",
    )
    .bind(subscription)
    .bind(ids)
    .fetch_optional(pool)
    .await
    .map_err(db(OP))?;
    Ok(done)
}
