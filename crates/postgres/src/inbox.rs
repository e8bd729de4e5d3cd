//! The consumer's idempotent inbox and the dead-letter table.

use chrono::{DateTime, Utc};
use custody_core::{DeadLetter, InboxOutcome, InboxStore, Message, Result};
use sqlx::{PgPool, Postgres, Row, Transaction};

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
}

/// Every dead letter in this database (relay's and consumers'), oldest first.
pub async fn dead_letters(pool: &PgPool) -> Result<Vec<DeadLetter>> {
    const OP: &str = "list dead letters";
    let rows = sqlx::query(
        "SELECT message_id, origin, topic, msg_key, message_type, payload, envelope, error, attempts, dead_at
         FROM custody_dead_letter ORDER BY seq",
    )
    .fetch_all(pool)
    .await
    .map_err(db(OP))?;
    rows.iter()
        .map(|r| {
            let attempts: i32 = r.try_get(8)?;
            Ok(DeadLetter {
                message_id: r.try_get(0)?,
                origin: r.try_get(1)?,
                topic: r.try_get(2)?,
                key: r.try_get(3)?,
                message_type: r.try_get(4)?,
                payload: r.try_get(5)?,
                envelope: r.try_get(6)?,
                error: r.try_get(7)?,
                attempts: u32::try_from(attempts).unwrap_or(0),
                dead_at: r.try_get(9)?,
            })
        })
        .collect::<std::result::Result<Vec<_>, sqlx::Error>>()
        .map_err(db(OP))
}
