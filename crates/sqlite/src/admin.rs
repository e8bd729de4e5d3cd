//! Operator functions: reader checkpoints and the dead-letter table.

use chrono::{DateTime, Utc};
use custody_core::{DeadLetter, Result};
use sqlx::{Row, SqliteExecutor, SqlitePool};
use uuid::Uuid;

use crate::error::map_err;

/// Checkpoints only move forward through [`Subscriber::ack`](custody_core::Subscriber::ack).
const ADVANCE: &str = "INSERT INTO custody_checkpoint (subscription, position, updated_at) \
     VALUES (?1, ?2, ?3) \
     ON CONFLICT (subscription) DO UPDATE SET \
       position = MAX(position, excluded.position), updated_at = excluded.updated_at";

/// Operators may move a checkpoint anywhere.
const SET: &str = "INSERT INTO custody_checkpoint (subscription, position, updated_at) \
     VALUES (?1, ?2, ?3) \
     ON CONFLICT (subscription) DO UPDATE SET \
       position = excluded.position, updated_at = excluded.updated_at";

pub(crate) async fn advance_checkpoint<'e>(
    executor: impl SqliteExecutor<'e>,
    subscription: &str,
    position: i64,
    now: DateTime<Utc>,
) -> Result<()> {
    sqlx::query(ADVANCE)
        .bind(subscription)
        .bind(position)
        .bind(crate::to_ms(now))
        .execute(executor)
        .await
        .map_err(map_err("save checkpoint"))?;
    Ok(())
}

/// Set the checkpoint of embedded reader `subscription` to `position`,
/// backwards (replay everything after it) or forwards (skip). Readers
/// already running keep their in-memory cursor; restart them.
pub async fn set_checkpoint(pool: &SqlitePool, subscription: &str, position: i64) -> Result<()> {
    sqlx::query(SET)
        .bind(subscription)
        .bind(position)
        .bind(crate::to_ms(Utc::now()))
        .execute(pool)
        .await
        .map_err(map_err("set checkpoint"))?;
    Ok(())
}

/// The stored checkpoint of `subscription`: the highest acknowledged
/// position, or `None` if it never acknowledged anything.
pub async fn checkpoint(pool: &SqlitePool, subscription: &str) -> Result<Option<i64>> {
    sqlx::query_scalar("SELECT position FROM custody_checkpoint WHERE subscription = ?1")
        .bind(subscription)
        .fetch_optional(pool)
        .await
        .map_err(map_err("read checkpoint"))
}

/// Every dead letter in this database (relay's and consumers'), oldest first.
pub async fn dead_letters(pool: &SqlitePool) -> Result<Vec<DeadLetter>> {
    const OP: &str = "list dead letters";
    let rows = sqlx::query(
        "SELECT message_id, origin, topic, msg_key, message_type, payload, envelope, error, \
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
            Ok(DeadLetter {
                message_id: message_id.and_then(|s| Uuid::parse_str(&s).ok()),
                origin: row.try_get("origin")?,
                topic: row.try_get("topic")?,
                key: row.try_get("msg_key")?,
                message_type: row.try_get("message_type")?,
                payload: row.try_get("payload")?,
                envelope: row.try_get("envelope")?,
                error: row.try_get("error")?,
                attempts: u32::try_from(attempts.max(0)).unwrap_or(u32::MAX),
                dead_at: DateTime::from_timestamp_millis(dead_at).unwrap_or_default(),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(map_err(OP))
}
