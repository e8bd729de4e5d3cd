//! The operations port ([`custody_core::Admin`]) over a SQLite database,
//! the driver that opens one by URL or path, reader checkpoints and the
//! dead-letter listing (the impl is custody-sql's [`custody_sql::admin_impl!`]).

use chrono::{DateTime, Utc};
use custody_core::admin::Driver;
use custody_core::Result;
use sqlx::{SqliteExecutor, SqlitePool};

use crate::error::map_err;
use crate::{SqliteInbox, SqliteOutbox};

/// The SQLite entry of the backend registry: `sqlite://path`, `sqlite:path`
/// or a plain file path (anything without a `scheme://`).
pub const DRIVER: Driver = Driver {
    name: "sqlite",
    forms: &["sqlite://path/to/file.db", "sqlite:path", "a file path"],
    accepts,
    open,
    migrate: migrate_url,
};

pub(crate) fn accepts(url: &str) -> bool {
    url.starts_with("sqlite:") || !url.contains("://")
}

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

custody_sql::admin_impl! {
    /// [`custody_core::Admin`] over one SQLite database.
    pub struct SqliteAdmin;
    pool: SqlitePool,
    outbox: SqliteOutbox,
    inbox: SqliteInbox,
    driver: DRIVER,
}
