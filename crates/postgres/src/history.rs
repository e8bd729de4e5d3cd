//! Reading and repairing history: reconciliation (producer and consumer
//! sides), message status, dead-letter operations, embedded-reader rewind.
//! See docs/OPERATIONS.md.

use chrono::{DateTime, Utc};
use custody_core::admin::outbox_status_name;
use custody_core::{IdRange, NumberedRow, Result};
use sqlx::{PgPool, Postgres, Transaction};
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
// Only published rows: a pending one is on its way already, a dead one is
// accounted for (redrive it instead).
const REPUBLISH: &str = "\
UPDATE custody_outbox SET status = 0, attempts = 0, retry_at = NULL, last_error = NULL,
    published_at = NULL, republish = republish + 1
WHERE id = ANY($1) AND status = 1";

// (duplicates = -1: redriven, not processed again yet; listed by
// custody_sql::history::REDRIVING)
const PROCESSED_IDS: &str = "\
SELECT COALESCE(array_agg(message_id), '{}') FROM custody_inbox
WHERE consumer = $1 AND message_id >= $2 AND message_id < $3 AND topic = $4
  AND duplicates >= 0";

fn key(id: &Uuid) -> Uuid {
    *id
}

// Dead letters by sequence number, for purge.
const PURGE: &str = "DELETE FROM custody_dead_letter WHERE seq = ANY($1)";

// The number is in the row once published (or failed, or dead), in the
// sequence journal while the row is in flight.
const OUTBOX_ROW: &str = concat!(
    "SELECT topic, message_type, msg_key, position, created_at, enqueued_at, status, attempts,
            retry_at, last_error, published_at, publish_ref, republish,
            COALESCE(seq, (",
    journal_number!(),
    ")) AS seq
     FROM custody_outbox o WHERE id = $1",
);

custody_sql::history_impl! {
    pool: PgPool,
    err: db,
    id: Uuid => Some,
    bind_id: key,
    time: DateTime<Utc> => std::convert::identity,
    count: i32,
    status: i16,
    partition: i32,
    at: std::convert::identity,
    purge: PURGE => std::convert::identity,
    redrive: {
        begin: begin,
        dead_letter: DEAD_LETTER,
        mark_inbox: mark_inbox,
        reset_relay: reset_relay,
    },
    outbox_row: OUTBOX_ROW;

    // the methods whose SQL is this backend's own
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
                    status: outbox_status_name(i64::from(status)).to_owned(),
                    published_at,
                })
                .collect())
        }
    }

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

    }
}

// Redriving one dead letter (custody_sql::history_impl!), PostgreSQL's part.

// FOR UPDATE: two operators redriving the same letter queue it once.
const DEAD_LETTER: &str =
    "SELECT message_id, origin, topic, envelope FROM custody_dead_letter WHERE seq = $1 FOR UPDATE";

async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>> {
    pool.begin().await.map_err(db("redrive dead letter"))
}

// Not deleted: marked (duplicates = -1) so the consumer's next record of
// the message counts as new once, while a numbered row keeps its number
// accounted for (no gap opens).
async fn mark_inbox(
    tx: &mut Transaction<'static, Postgres>,
    consumer: &str,
    id: &Uuid,
) -> Result<()> {
    sqlx::query("UPDATE custody_inbox SET duplicates = -1 WHERE consumer = $1 AND message_id = $2")
        .bind(consumer)
        .bind(id)
        .execute(&mut **tx)
        .await
        .map_err(db("redrive dead letter"))?;
    Ok(())
}

// seq = NULL: the skip marker left in its place accounted for its old
// number; the relay gives it a new one (and out of the sequence journal,
// whose entry would give it the old number back).
async fn reset_relay(tx: &mut Transaction<'static, Postgres>, id: Option<Uuid>) -> Result<bool> {
    const OP: &str = "redrive dead letter";
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
    .fetch_one(&mut **tx)
    .await
    .map_err(db(OP))?;
    if reset == 0 {
        return Ok(false);
    }
    sqlx::query("SELECT pg_notify('custody_outbox', '')")
        .execute(&mut **tx)
        .await
        .map_err(db(OP))?;
    Ok(true)
}

// rewind_checkpoint (custody_sql::history_impl!) in this backend's order.
async fn rewind(pool: &PgPool, subscription: &str, ids: &[Uuid]) -> Result<Option<i64>> {
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
