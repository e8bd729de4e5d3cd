//! Reading and repairing history: reconciliation (producer and consumer
//! sides), message status, dead-letter operations, embedded-reader rewind.
//! See docs/OPERATIONS.md.

use chrono::{DateTime, Utc};
use custody_core::admin::outbox_status_name;
use custody_core::{IdRange, NumberedRow, Result};
use sqlx::{Sqlite, SqlitePool, Transaction};
use uuid::Uuid;

use crate::error::map_err;
use crate::{to_ms, SqliteInbox, SqliteOutbox};

fn text(id: &Uuid) -> String {
    id.hyphenated().to_string()
}

fn ids_json(ids: &[Uuid]) -> String {
    serde_json::to_string(&ids.iter().map(text).collect::<Vec<_>>()).unwrap_or_else(|_| "[]".into())
}

/// A stored id; `None` (left out) when it is not a uuid.
fn parse_uuid(id: String) -> Option<Uuid> {
    Uuid::parse_str(&id).ok()
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
/// Only published rows: a pending one is on its way already, a dead one is
/// accounted for (redrive it instead).
const REPUBLISH: &str = "UPDATE custody_outbox SET status = 0, attempts = 0, retry_at = NULL, \
     last_error = NULL, published_at = NULL, republish = republish + 1 \
     WHERE id IN (SELECT value FROM json_each(?1)) AND status = 1";
/// The rows holding numbers `?3` (a JSON array) of one topic and partition.
/// Served by custody_outbox_seq (partition, seq); `+topic` keeps the planner
/// off the (topic, position) index, which would read every row of the topic.
const NUMBERED: &str = "SELECT seq, id, status, published_at FROM custody_outbox \
     WHERE +topic = ?1 AND partition = ?2 AND seq IN (SELECT value FROM json_each(?3)) \
     ORDER BY seq, position";

// (duplicates = -1: redriven, not processed again yet; listed by
// custody_sql::history::REDRIVING)
const PROCESSED_IDS: &str = "SELECT group_concat(message_id, '') FROM custody_inbox \
     WHERE consumer = ?1 AND message_id >= ?2 AND message_id < ?3 AND topic = ?4 \
       AND duplicates >= 0";

// Dead letters by sequence number, for purge.
const PURGE: &str =
    "DELETE FROM custody_dead_letter WHERE seq IN (SELECT value FROM json_each(?1))";

const OUTBOX_ROW: &str = "SELECT topic, message_type, msg_key, position, created_at, enqueued_at, \
     status, attempts, retry_at, last_error, published_at, publish_ref, republish, seq \
     FROM custody_outbox WHERE id = $1";

custody_sql::history_impl! {
    pool: SqlitePool,
    err: map_err,
    id: String => parse_uuid,
    bind_id: text,
    time: i64 => ms,
    count: i64,
    status: i64,
    partition: i64,
    at: to_ms,
    purge: PURGE => crate::outbox::json_list,
    redrive: {
        begin: begin,
        dead_letter: DEAD_LETTER,
        mark_inbox: mark_inbox,
        reset_relay: reset_relay,
    },
    outbox_row: OUTBOX_ROW;

    // the methods whose SQL is this backend's own
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

        async fn republish(&self, ids: &[Uuid]) -> Result<u64> {
            let done = sqlx::query(REPUBLISH)
                .bind(ids_json(ids))
                .execute(self.pool())
                .await
                .map_err(map_err("republish outbox rows"))?;
            self.notify();
            Ok(done.rows_affected())
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
                        status: outbox_status_name(status).to_owned(),
                        published_at: published_at.map(ms),
                    })
                })
                .collect())
        }
    }

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

    }
}

// Redriving one dead letter (custody_sql::history_impl!), SQLite's part.
// BEGIN IMMEDIATE takes the write lock first: two operators redriving the
// same letter queue it once (the second finds it gone).

const DEAD_LETTER: &str =
    "SELECT message_id, origin, topic, envelope FROM custody_dead_letter WHERE seq = $1";

async fn begin(pool: &SqlitePool) -> Result<Transaction<'static, Sqlite>> {
    pool.begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(map_err("redrive dead letter"))
}

// The consumer's unnumbered inbox row is deleted. A numbered row stays,
// marked `duplicates = -1` (see the inbox's RECORD): the next record of the
// message is its first, while the row keeps the number accounted for.
// Deleting it would open a hole nothing fills: the redriven message is
// processed outside the numbering.
async fn mark_inbox(
    tx: &mut Transaction<'static, Sqlite>,
    consumer: &str,
    id: &String,
) -> Result<()> {
    const OP: &str = "redrive dead letter";
    sqlx::query(
        "DELETE FROM custody_inbox WHERE consumer = ?1 AND message_id = ?2 AND seq IS NULL",
    )
    .bind(consumer)
    .bind(id)
    .execute(&mut **tx)
    .await
    .map_err(map_err(OP))?;
    sqlx::query(
        "UPDATE custody_inbox SET duplicates = -1 \
         WHERE consumer = ?1 AND message_id = ?2 AND seq IS NOT NULL",
    )
    .bind(consumer)
    .bind(id)
    .execute(&mut **tx)
    .await
    .map_err(map_err(OP))?;
    Ok(())
}

// seq = NULL: the skip marker left in its place accounted for its old
// number; the relay gives it a new one.
async fn reset_relay(tx: &mut Transaction<'static, Sqlite>, id: Option<Uuid>) -> Result<bool> {
    let reset = sqlx::query(
        "UPDATE custody_outbox SET status = 0, attempts = 0, retry_at = NULL, \
         last_error = NULL, republish = republish + 1, seq = NULL \
         WHERE id = ?1 AND status = 2",
    )
    .bind(id.as_ref().map(text))
    .execute(&mut **tx)
    .await
    .map_err(map_err("redrive dead letter"))?;
    Ok(reset.rows_affected() != 0)
}

// rewind_checkpoint (custody_sql::history_impl!) in this backend's order.
async fn rewind(pool: &SqlitePool, subscription: &str, ids: &[Uuid]) -> Result<Option<i64>> {
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
