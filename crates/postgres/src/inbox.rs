//! The consumer's idempotent inbox and the dead-letter table.

use chrono::{DateTime, Utc};
use custody_core::{DeadLetter, InboxOutcome, InboxStore, Message, Redrive, Result};
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

// The row lock taken by the insert (or by the conflicting update) serializes
// two deliveries of one message to one consumer: the second waits for the
// first transaction and then counts as a duplicate, or as new if the first
// rolled back.
const RECORD: &str = "\
INSERT INTO custody_inbox (consumer, message_id, topic, processed_at)
VALUES ($1, $2, $3, $4)
ON CONFLICT (consumer, message_id) DO UPDATE SET duplicates = custody_inbox.duplicates + 1
RETURNING duplicates";

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
        let duplicates: i32 = sqlx::query_scalar(RECORD)
            .bind(consumer)
            .bind(message.id)
            .bind(&message.topic)
            .bind(now)
            .fetch_one(&mut **tx)
            .await
            .map_err(db("record in inbox"))?;
        Ok(if duplicates == 0 {
            InboxOutcome::New
        } else {
            InboxOutcome::Duplicate
        })
    }

    async fn commit(&self, tx: Self::Tx) -> Result<()> {
        tx.commit().await.map_err(db("commit inbox transaction"))
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
            // so a redelivery is recognised and skipped
            sqlx::query(
                "INSERT INTO custody_inbox (consumer, message_id, topic, processed_at)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (consumer, message_id) DO NOTHING",
            )
            .bind(consumer)
            .bind(id)
            .bind(&dead.topic)
            .bind(dead.dead_at)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
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
        let done = sqlx::query(PRUNE_INBOX)
            .bind(consumer)
            .bind(older_than)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await
            .map_err(db("prune inbox"))?;
        Ok(done.rows_affected())
    }
}

// Inbox retention (InboxStore::prune): one consumer's oldest rows off the
// custody_inbox_processed index (migration 0003), at most $3 per statement.
// Rows of messages that still have a dead letter stay, so a redelivery keeps
// being skipped until the letter is redriven or purged. SKIP LOCKED: a row a
// consumer transaction is updating (a duplicate being counted) is left for
// the next round instead of waited on.
const PRUNE_INBOX: &str = "\
DELETE FROM custody_inbox
WHERE consumer = $1 AND message_id = ANY(ARRAY(
    SELECT i.message_id FROM custody_inbox i
    WHERE i.consumer = $1 AND i.processed_at < $2
      AND NOT EXISTS (SELECT 1 FROM custody_dead_letter d
                      WHERE d.message_id = i.message_id AND d.origin = 'consumer:' || $1)
    ORDER BY i.processed_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED))";

/// Every dead letter in this database (relay's and consumers'), oldest first.
/// [`crate::dead_letter_rows`] without the sequence numbers.
pub async fn dead_letters(pool: &PgPool) -> Result<Vec<DeadLetter>> {
    let rows = crate::dead_letter_rows(pool).await?;
    Ok(rows.into_iter().map(|(_, dead)| dead).collect())
}
