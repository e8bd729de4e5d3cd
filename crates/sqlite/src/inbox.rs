//! The consumer's idempotent inbox.

use chrono::{DateTime, Utc};
use custody_core::{DeadLetter, InboxOutcome, InboxStore, Message, Redrive, Result};
use sqlx::{Sqlite, SqlitePool, Transaction};

use crate::error::map_err;
use crate::to_ms;

/// First sight inserts with `duplicates = 0`; a redelivery bumps the counter
/// in the consumer's transaction, so `RETURNING duplicates` tells the two
/// apart in one statement.
const RECORD: &str = "INSERT INTO custody_inbox (consumer, message_id, topic, processed_at) \
     VALUES (?1, ?2, ?3, ?4) \
     ON CONFLICT (consumer, message_id) DO UPDATE SET duplicates = duplicates + 1 \
     RETURNING duplicates";

const INSERT_DEAD_LETTER: &str = "INSERT INTO custody_dead_letter \
     (message_id, origin, topic, msg_key, message_type, payload, envelope, error, attempts, dead_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

const INSERT_DEAD_INBOX: &str =
    "INSERT INTO custody_inbox (consumer, message_id, topic, processed_at) \
     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (consumer, message_id) DO NOTHING";

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
        let duplicates: i64 = sqlx::query_scalar(RECORD)
            .bind(consumer)
            .bind(message.id.hyphenated().to_string())
            .bind(message.topic.as_str())
            .bind(to_ms(now))
            .fetch_one(&mut **tx)
            .await
            .map_err(map_err("record in inbox"))?;
        Ok(if duplicates == 0 {
            InboxOutcome::New
        } else {
            InboxOutcome::Duplicate
        })
    }

    async fn commit(&self, tx: Self::Tx) -> Result<()> {
        tx.commit()
            .await
            .map_err(map_err("commit inbox transaction"))
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
            sqlx::query(INSERT_DEAD_INBOX)
                .bind(consumer)
                .bind(id)
                .bind(dead.topic.as_str())
                .bind(to_ms(dead.dead_at))
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
        let mut out = Vec::with_capacity(rows.len());
        for (seq, envelope) in rows {
            match serde_json::from_str::<Message>(&envelope) {
                Ok(message) => out.push(Redrive { seq, message }),
                Err(e) => {
                    // `dlq redrive` checked it; a hand-edited row is dropped, loudly.
                    tracing::error!(seq, error = %e, "redrive row has an unreadable envelope; dropping it");
                    self.drop_redrive(seq).await?;
                }
            }
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
        let done = sqlx::query(PRUNE_INBOX)
            .bind(consumer)
            .bind(to_ms(older_than))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await
            .map_err(map_err(OP))?;
        Ok(done.rows_affected())
    }
}

/// Inbox retention ([`InboxStore::prune`]): the oldest rows of one consumer
/// off the `custody_inbox_processed` index (migration 0003), at most `?3`
/// per statement (one short write lock). Rows of messages that still have a
/// dead letter stay, so a redelivery keeps being skipped until the dead
/// letter is redriven or purged.
const PRUNE_INBOX: &str = "DELETE FROM custody_inbox WHERE consumer = ?1 AND message_id IN ( \
     SELECT i.message_id FROM custody_inbox AS i \
     WHERE i.consumer = ?1 AND i.processed_at < ?2 \
       AND NOT EXISTS (SELECT 1 FROM custody_dead_letter AS d \
                       WHERE d.message_id = i.message_id AND d.origin = 'consumer:' || ?1) \
     ORDER BY i.processed_at LIMIT ?3)";
