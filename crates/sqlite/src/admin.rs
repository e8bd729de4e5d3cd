//! Operator functions: reader checkpoints and the dead-letter table.

use chrono::{DateTime, Utc};
use custody_core::{DeadLetter, Result};
use sqlx::{SqliteExecutor, SqlitePool};

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
/// [`crate::dead_letter_rows`] without the sequence numbers.
pub async fn dead_letters(pool: &SqlitePool) -> Result<Vec<DeadLetter>> {
    let rows = crate::dead_letter_rows(pool).await?;
    Ok(rows.into_iter().map(|(_, dead)| dead).collect())
}
