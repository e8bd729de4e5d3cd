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
use sqlx::{Row, SqlitePool};
use uuid::Uuid;

use crate::error::map_err;
use crate::{to_ms, SqliteInbox, SqliteOutbox};

fn text(id: &Uuid) -> String {
    id.hyphenated().to_string()
}

fn ids_json(ids: &[Uuid]) -> String {
    serde_json::to_string(&ids.iter().map(text).collect::<Vec<_>>()).unwrap_or_else(|_| "[]".into())
}

fn parse_ids(rows: Vec<String>) -> Vec<Uuid> {
    rows.iter()
        .filter_map(|s| Uuid::parse_str(s).ok())
        .collect()
}

/// Split concatenated 36-character hyphenated ids.
fn parse_concatenated(page: &str, column: &str) -> Result<Vec<Uuid>> {
    const LEN: usize = 36;
    if page.len() % LEN != 0 {
        return Err(custody_core::Error::store(
            "sqlite",
            "read history",
            false,
            format!("{column} holds a value that is not a hyphenated uuid; fix or delete that row"),
        ));
    }
    let mut out = Vec::with_capacity(page.len() / LEN);
    for chunk in page.as_bytes().chunks_exact(LEN) {
        let id = Uuid::try_parse_ascii(chunk).map_err(|e| {
            custody_core::Error::store(
                "sqlite",
                "read history",
                false,
                format!(
                    "{column} holds {:?}, not a uuid ({e}); fix or delete that row",
                    String::from_utf8_lossy(chunk)
                ),
            )
        })?;
        out.push(id);
    }
    Ok(out)
}

fn ms(t: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t).unwrap_or_default()
}

// Ids are hyphenated lowercase text: their string order is their byte order,
// so an id range is a range of the UNIQUE (id) index. `+topic` keeps the
// planner off the (topic, position) index, which would read every row of the
// topic for each slice. One row per slice (the ids concatenated), not one
// row per id: a million ids cost a few dozen statements and no per-row
// overhead.
const SENT_IDS: &str = "SELECT group_concat(id, '') FROM custody_outbox \
     WHERE id >= ?1 AND id < ?2 AND +topic = ?3 AND status <> 2";
const SENT_DEAD: &str = "SELECT id, COALESCE(last_error, '') FROM custody_outbox \
     WHERE id >= ?1 AND id < ?2 AND topic = ?3 AND status = 2 ORDER BY id";
/// Only published rows: a pending one is on its way already, a dead one is
/// accounted for (redrive it instead).
const REPUBLISH: &str = "UPDATE custody_outbox SET status = 0, attempts = 0, retry_at = NULL, \
     last_error = NULL, published_at = NULL, republish = republish + 1 \
     WHERE id IN (SELECT value FROM json_each(?1)) AND status = 1";
/// The last number given per (topic, partition); no row or `next_seq = 1`:
/// nothing numbered there yet.
const SEQUENCE_HEADS: &str = "SELECT topic, partition, next_seq - 1 FROM custody_sequence \
     WHERE next_seq > 1 ORDER BY topic, partition";
/// The rows holding numbers `?3` (a JSON array) of one topic and partition.
/// Served by custody_outbox_seq (partition, seq); `+topic` keeps the planner
/// off the (topic, position) index, which would read every row of the topic.
const NUMBERED: &str = "SELECT seq, id, status, published_at FROM custody_outbox \
     WHERE +topic = ?1 AND partition = ?2 AND seq IN (SELECT value FROM json_each(?3)) \
     ORDER BY seq, position";

impl SentHistory for SqliteOutbox {
    async fn sent_ids(&self, topic: &str, range: IdRange) -> Result<Vec<Uuid>> {
        let page: Option<String> = sqlx::query_scalar(SENT_IDS)
            .bind(text(&range.from))
            .bind(text(&range.to))
            .bind(topic)
            .fetch_one(self.pool())
            .await
            .map_err(map_err("read outbox history"))?;
        parse_concatenated(page.as_deref().unwrap_or(""), "custody_outbox.id")
    }

    async fn sent_dead(&self, topic: &str, range: IdRange) -> Result<Vec<(Uuid, String)>> {
        let rows: Vec<(String, String)> = sqlx::query_as(SENT_DEAD)
            .bind(text(&range.from))
            .bind(text(&range.to))
            .bind(topic)
            .fetch_all(self.pool())
            .await
            .map_err(map_err("read dead outbox rows"))?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, e)| Uuid::parse_str(&id).ok().map(|id| (id, e)))
            .collect())
    }

    async fn republish(&self, ids: &[Uuid]) -> Result<u64> {
        let done = sqlx::query(REPUBLISH)
            .bind(ids_json(ids))
            .execute(self.pool())
            .await
            .map_err(map_err("republish outbox rows"))?;
        self.notify();
        Ok(done.rows_affected())
    }

    async fn sequence_heads(&self) -> Result<Option<(String, Vec<SequenceHead>)>> {
        // The stored id, read only (OutboxStore::producer_id may renew it
        // for a copied file, and a check never writes to what it checks).
        let producer: Option<String> =
            sqlx::query_scalar("SELECT id FROM custody_producer ORDER BY created_at, id LIMIT 1")
                .fetch_optional(self.pool())
                .await
                .map_err(map_err("read producer id"))?;
        let Some(producer) = producer else {
            return Ok(None);
        };
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(SEQUENCE_HEADS)
            .fetch_all(self.pool())
            .await
            .map_err(map_err("read sequence heads"))?;
        let heads = rows
            .into_iter()
            .filter_map(|(topic, partition, last)| {
                Some(SequenceHead {
                    topic,
                    // not a partition or number custody wrote: skip it
                    partition: u32::try_from(partition).ok()?,
                    last: u64::try_from(last).ok()?,
                })
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
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(i64, String, i64, Option<i64>)> = sqlx::query_as(NUMBERED)
            .bind(topic)
            .bind(i64::from(partition))
            .bind(crate::outbox::json_list(seqs))
            .fetch_all(self.pool())
            .await
            .map_err(map_err("read numbered outbox rows"))?;
        Ok(rows
            .into_iter()
            .filter_map(|(seq, id, status, published_at)| {
                Some(NumberedRow {
                    seq: u64::try_from(seq).ok()?,
                    id: Uuid::parse_str(&id).ok()?,
                    status: status_name(status),
                    published_at: published_at.map(ms),
                })
            })
            .collect())
    }
}

const PROCESSED_IDS: &str = "SELECT group_concat(message_id, '') FROM custody_inbox \
     WHERE consumer = ?1 AND message_id >= ?2 AND message_id < ?3 AND topic = ?4 \
       AND duplicates >= 0";
// (duplicates = -1: redriven, not processed again yet; listed by REDRIVING)
const PROCESSED_DEAD: &str = "SELECT message_id, error FROM custody_dead_letter \
     WHERE origin = 'consumer:' || ?1 AND topic = ?2 AND message_id >= ?3 AND message_id < ?4 \
     ORDER BY message_id";
const REDRIVING: &str = "SELECT message_id FROM custody_redrive \
     WHERE consumer = ?1 AND topic = ?2 AND message_id >= ?3 AND message_id < ?4 ORDER BY message_id";
/// The distinct numbers above the floor `?5` (a skip marker and its
/// original can share one), each with its first record, lowest first, at
/// most `?6`: a range of the partial index custody_inbox_seq.
const NUMBERS_ABOVE_FLOOR: &str = "SELECT seq, MIN(processed_at) FROM custody_inbox \
     WHERE consumer = ?1 AND producer = ?2 AND topic = ?3 AND producer_partition = ?4 \
       AND seq > ?5 \
     GROUP BY seq ORDER BY seq LIMIT ?6";

impl ProcessedHistory for SqliteInbox {
    async fn processed_ids(
        &self,
        consumer: &str,
        topic: &str,
        range: IdRange,
    ) -> Result<Vec<Uuid>> {
        let page: Option<String> = sqlx::query_scalar(PROCESSED_IDS)
            .bind(consumer)
            .bind(text(&range.from))
            .bind(text(&range.to))
            .bind(topic)
            .fetch_one(self.pool())
            .await
            .map_err(map_err("read inbox history"))?;
        parse_concatenated(page.as_deref().unwrap_or(""), "custody_inbox.message_id")
    }

    async fn processed_dead(
        &self,
        consumer: &str,
        topic: &str,
        range: IdRange,
    ) -> Result<Vec<(Uuid, String)>> {
        let rows: Vec<(String, String)> = sqlx::query_as(PROCESSED_DEAD)
            .bind(consumer)
            .bind(topic)
            .bind(text(&range.from))
            .bind(text(&range.to))
            .fetch_all(self.pool())
            .await
            .map_err(map_err("read consumer dead letters"))?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, e)| Uuid::parse_str(&id).ok().map(|id| (id, e)))
            .collect())
    }

    async fn redriving(&self, consumer: &str, topic: &str, range: IdRange) -> Result<Vec<Uuid>> {
        let rows: Vec<String> = sqlx::query_scalar(REDRIVING)
            .bind(consumer)
            .bind(topic)
            .bind(text(&range.from))
            .bind(text(&range.to))
            .fetch_all(self.pool())
            .await
            .map_err(map_err("read redrive queue"))?;
        Ok(parse_ids(rows))
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
        let rows: Vec<(i64, i64)> = sqlx::query_as(NUMBERS_ABOVE_FLOOR)
            .bind(consumer)
            .bind(&p.producer)
            .bind(&p.topic)
            .bind(i64::from(p.partition))
            .bind(i64::try_from(p.floor).unwrap_or(i64::MAX))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(self.pool())
            .await
            .map_err(map_err("read inbox numbers"))?;
        Ok(rows
            .into_iter()
            .filter_map(|(seq, at)| Some((u64::try_from(seq).ok()?, ms(at))))
            .collect())
    }
}

/// Everything this database's custody tables know about message `id`: its
/// outbox row (producer), inbox rows (consumers), dead letters, redrives.
pub async fn status(pool: &SqlitePool, id: Uuid) -> Result<MessageStatus> {
    const OP: &str = "read message status";
    let key = text(&id);
    let mut st = MessageStatus::new(id);
    let row = sqlx::query(
        "SELECT topic, message_type, msg_key, position, created_at, enqueued_at, status, attempts, \
         retry_at, last_error, published_at, publish_ref, republish, seq FROM custody_outbox WHERE id = ?1",
    )
    .bind(&key)
    .fetch_optional(pool)
    .await
    .map_err(map_err(OP))?;
    if let Some(r) = row {
        let status: i64 = r.try_get("status").map_err(map_err(OP))?;
        st.producer = Some(ProducerSide {
            topic: r.try_get("topic").map_err(map_err(OP))?,
            message_type: r.try_get("message_type").map_err(map_err(OP))?,
            key: r.try_get("msg_key").map_err(map_err(OP))?,
            position: r.try_get("position").map_err(map_err(OP))?,
            created_at: ms(r.try_get("created_at").map_err(map_err(OP))?),
            enqueued_at: ms(r.try_get("enqueued_at").map_err(map_err(OP))?),
            status: status_name(status),
            attempts: u32::try_from(r.try_get::<i64, _>("attempts").map_err(map_err(OP))?)
                .unwrap_or(0),
            retry_at: r
                .try_get::<Option<i64>, _>("retry_at")
                .map_err(map_err(OP))?
                .map(ms),
            last_error: r.try_get("last_error").map_err(map_err(OP))?,
            published_at: r
                .try_get::<Option<i64>, _>("published_at")
                .map_err(map_err(OP))?
                .map(ms),
            publish_ref: r.try_get("publish_ref").map_err(map_err(OP))?,
            republished: u32::try_from(r.try_get::<i64, _>("republish").map_err(map_err(OP))?)
                .unwrap_or(0),
            sequence: r
                .try_get::<Option<i64>, _>("seq")
                .map_err(map_err(OP))?
                .and_then(|s| u64::try_from(s).ok()),
        });
    }
    let dead = sqlx::query(
        "SELECT origin, error, attempts, dead_at FROM custody_dead_letter WHERE message_id = ?1 ORDER BY seq",
    )
    .bind(&key)
    .fetch_all(pool)
    .await
    .map_err(map_err(OP))?;
    for r in &dead {
        st.dead.push(DeadLetterInfo {
            origin: r.try_get("origin").map_err(map_err(OP))?,
            error: r.try_get("error").map_err(map_err(OP))?,
            attempts: u32::try_from(r.try_get::<i64, _>("attempts").map_err(map_err(OP))?)
                .unwrap_or(0),
            dead_at: ms(r.try_get("dead_at").map_err(map_err(OP))?),
        });
    }
    let inbox = sqlx::query(
        "SELECT consumer, processed_at, duplicates FROM custody_inbox \
         WHERE message_id = ?1 AND duplicates >= 0 ORDER BY consumer",
    )
    .bind(&key)
    .fetch_all(pool)
    .await
    .map_err(map_err(OP))?;
    for r in &inbox {
        let consumer: String = r.try_get("consumer").map_err(map_err(OP))?;
        let origin = format!("consumer:{consumer}");
        st.consumers.push(ConsumerSide {
            dead: st.dead.iter().any(|d| d.origin == origin),
            consumer,
            processed_at: ms(r.try_get("processed_at").map_err(map_err(OP))?),
            duplicates: u32::try_from(r.try_get::<i64, _>("duplicates").map_err(map_err(OP))?)
                .unwrap_or(0),
        });
    }
    let redrives = sqlx::query(
        "SELECT consumer, redriven_at FROM custody_redrive WHERE message_id = ?1 ORDER BY seq",
    )
    .bind(&key)
    .fetch_all(pool)
    .await
    .map_err(map_err(OP))?;
    for r in &redrives {
        st.redriving.push(RedriveInfo {
            consumer: r.try_get("consumer").map_err(map_err(OP))?,
            redriven_at: ms(r.try_get("redriven_at").map_err(map_err(OP))?),
        });
    }
    Ok(st)
}

fn status_name(s: i64) -> String {
    match s {
        0 => "pending",
        1 => "published",
        2 => "dead",
        _ => "unknown",
    }
    .to_owned()
}

/// Every dead letter with its sequence number (the handle of `redrive` and
/// `purge`), oldest first.
pub async fn dead_letter_rows(pool: &SqlitePool) -> Result<Vec<(i64, DeadLetter)>> {
    const OP: &str = "list dead letters";
    let rows = sqlx::query(
        "SELECT seq, message_id, origin, topic, msg_key, message_type, payload, envelope, error, \
         attempts, dead_at FROM custody_dead_letter ORDER BY seq",
    )
    .fetch_all(pool)
    .await
    .map_err(map_err(OP))?;
    rows.iter()
        .map(|row| {
            let message_id: Option<String> = row.try_get("message_id")?;
            let attempts: i64 = row.try_get("attempts")?;
            let dead_at: i64 = row.try_get("dead_at")?;
            Ok((
                row.try_get("seq")?,
                DeadLetter {
                    message_id: message_id.and_then(|s| Uuid::parse_str(&s).ok()),
                    origin: row.try_get("origin")?,
                    topic: row.try_get("topic")?,
                    key: row.try_get("msg_key")?,
                    message_type: row.try_get("message_type")?,
                    payload: row.try_get("payload")?,
                    envelope: row.try_get("envelope")?,
                    error: row.try_get("error")?,
                    attempts: u32::try_from(attempts.max(0)).unwrap_or(u32::MAX),
                    dead_at: ms(dead_at),
                },
            ))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(map_err(OP))
}

/// Send dead letters `seqs` back, each in its own transaction, as
/// [`redrive_target`] decides:
///
/// - a consumer's (`consumer:<name>`): its stored envelope goes to
///   `custody_redrive`, and the dead letter and the consumer's inbox row
///   are deleted (a numbered inbox row stays, keeping its number accounted
///   for; [`InboxStore::record`](custody_core::InboxStore::record) lets the
///   message through once while the redrive is queued); the consumer
///   engine processes it once through the inbox;
/// - the relay's: the outbox row goes back to pending (attempts 0, marked as
///   a republish, its sequence number cleared: the skip marker accounted for
///   it) and the dead letter is deleted.
///
/// A dead letter without an envelope (a malformed message) or whose outbox
/// row was pruned is skipped, with the reason.
pub async fn redrive(
    pool: &SqlitePool,
    seqs: &[i64],
    now: DateTime<Utc>,
) -> Result<RedriveOutcome> {
    let mut out = RedriveOutcome::default();
    for &seq in seqs {
        out.add(seq, redrive_one(pool, seq, now).await?);
    }
    Ok(out)
}

async fn redrive_one(pool: &SqlitePool, seq: i64, now: DateTime<Utc>) -> Result<RedriveStep> {
    const OP: &str = "redrive dead letter";
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(map_err(OP))?;
    let row = sqlx::query(
        "SELECT message_id, origin, topic, envelope FROM custody_dead_letter WHERE seq = ?1",
    )
    .bind(seq)
    .fetch_optional(&mut *tx)
    .await
    .map_err(map_err(OP))?;
    let Some(row) = row else {
        return Ok(RedriveStep::Skipped(SKIP_NO_SUCH));
    };
    let id: Option<String> = row.try_get("message_id").map_err(map_err(OP))?;
    let origin: String = row.try_get("origin").map_err(map_err(OP))?;
    let topic: String = row.try_get("topic").map_err(map_err(OP))?;
    let envelope: Option<String> = row.try_get("envelope").map_err(map_err(OP))?;
    let id = id.and_then(|s| Uuid::parse_str(&s).ok());
    let step = match redrive_target(&origin, id, envelope.as_deref()) {
        RedriveTarget::Skip(why) => return Ok(RedriveStep::Skipped(why)),
        RedriveTarget::Consumer {
            consumer,
            id,
            envelope,
        } => {
            let id = text(&id);
            sqlx::query(
                "INSERT INTO custody_redrive (consumer, message_id, topic, envelope, redriven_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (consumer, message_id) DO NOTHING",
            )
            .bind(consumer)
            .bind(&id)
            .bind(&topic)
            .bind(envelope)
            .bind(to_ms(now))
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?;
            // A numbered row stays, marked `duplicates = -1` (see the inbox's
            // RECORD): the next record of the message is its first, while
            // the row keeps the number accounted for. Deleting it would open
            // a hole nothing fills: the redriven message is processed outside
            // the numbering.
            sqlx::query(
                "DELETE FROM custody_inbox WHERE consumer = ?1 AND message_id = ?2 AND seq IS NULL",
            )
            .bind(consumer)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?;
            sqlx::query(
                "UPDATE custody_inbox SET duplicates = -1 \
                 WHERE consumer = ?1 AND message_id = ?2 AND seq IS NOT NULL",
            )
            .bind(consumer)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?;
            RedriveStep::ToConsumer
        }
        RedriveTarget::Relay { id } => {
            // seq = NULL: the skip marker left in its place accounted for its
            // old number; the relay gives it a new one.
            let reset = sqlx::query(
                "UPDATE custody_outbox SET status = 0, attempts = 0, retry_at = NULL, \
                 last_error = NULL, republish = republish + 1, seq = NULL \
                 WHERE id = ?1 AND status = 2",
            )
            .bind(id.as_ref().map(text))
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?;
            if reset.rows_affected() == 0 {
                return Ok(RedriveStep::Skipped(SKIP_OUTBOX_ROW_GONE));
            }
            RedriveStep::ToRelay
        }
    };
    sqlx::query("DELETE FROM custody_dead_letter WHERE seq = ?1")
        .bind(seq)
        .execute(&mut *tx)
        .await
        .map_err(map_err(OP))?;
    tx.commit().await.map_err(map_err(OP))?;
    Ok(step)
}

/// Delete dead letters `seqs`. A consumer's inbox row stays, so a late
/// redelivery of the message is still skipped. Returns how many were deleted.
pub async fn purge(pool: &SqlitePool, seqs: &[i64]) -> Result<u64> {
    let done = sqlx::query(
        "DELETE FROM custody_dead_letter WHERE seq IN (SELECT value FROM json_each(?1))",
    )
    .bind(crate::outbox::json_list(seqs))
    .execute(pool)
    .await
    .map_err(map_err("purge dead letters"))?;
    Ok(done.rows_affected())
}

/// Repair for the embedded transport: move `subscription`'s checkpoint back
/// to just before the earliest outbox row of `ids`, so the reader delivers
/// them again (its consumer's inbox skips the ones it has). Never moves the
/// checkpoint forward. Returns the new checkpoint, or `None` when nothing
/// needed rewinding. Stop the consumer first: a running reader keeps its
/// in-memory cursor and its next acknowledgement moves the checkpoint past
/// the rewind again.
pub async fn rewind_checkpoint(
    pool: &SqlitePool,
    subscription: &str,
    ids: &[Uuid],
) -> Result<Option<i64>> {
    const OP: &str = "rewind checkpoint";
    let first: Option<i64> = sqlx::query_scalar(
        "SELECT MIN(position) FROM custody_outbox WHERE id IN (SELECT value FROM json_each(?1))",
    )
    .bind(ids_json(ids))
    .fetch_one(pool)
    .await
    .map_err(map_err(OP))?;
    let Some(first) = first else { return Ok(None) };
    let current = crate::checkpoint(pool, subscription).await?;
    match current {
        Some(c) if c >= first => {
            crate::set_checkpoint(pool, subscription, first - 1).await?;
            Ok(Some(first - 1))
        }
        _ => Ok(None),
    }
}
