//! The operations port ([`custody_core::Admin`]) over a SQLite database,
//! the driver that opens one by URL or path, reader checkpoints and the
//! dead-letter listing.

use chrono::{DateTime, Utc};
use custody_core::admin::{Access, Admin, BoxFuture, Driver, NumberedDeadLetter};
use custody_core::{
    AcceptedGap, DeadLetter, DynProcessedHistory, DynSentHistory, GapAcceptance, InboxStore,
    MessageStatus, RedriveOutcome, Result,
};
use sqlx::{SqliteExecutor, SqlitePool};
use uuid::Uuid;

use crate::error::map_err;
use crate::{SqliteInbox, SqliteOutbox};

/// The SQLite entry of the backend registry: `sqlite://path`, `sqlite:path`
/// or a plain file path (anything without a `scheme://`).
pub const DRIVER: Driver = Driver {
    name: "sqlite",
    forms: &["sqlite://path/to/file.db", "sqlite:path", "a file path"],
    accepts,
    open,
};

fn accepts(url: &str) -> bool {
    url.starts_with("sqlite:") || !url.contains("://")
}

fn open(url: &str, access: Access) -> BoxFuture<'_, Result<Box<dyn Admin>>> {
    Box::pin(async move {
        let pool = match access {
            Access::Existing => crate::open_existing(url).await?,
            Access::Migrate => {
                let pool = crate::connect(url).await?;
                crate::migrate(&pool).await?;
                pool
            }
        };
        Ok(Box::new(SqliteAdmin::new(pool)) as Box<dyn Admin>)
    })
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

/// Every dead letter in this database (relay's and consumers'), oldest first.
/// [`crate::dead_letter_rows`] without the sequence numbers.
pub async fn dead_letters(pool: &SqlitePool) -> Result<Vec<DeadLetter>> {
    let rows = crate::dead_letter_rows(pool).await?;
    Ok(rows.into_iter().map(|(_, dead)| dead).collect())
}

/// [`custody_core::Admin`] over one SQLite database.
pub struct SqliteAdmin {
    pool: SqlitePool,
    outbox: SqliteOutbox,
    inbox: SqliteInbox,
}

impl SqliteAdmin {
    /// Operations over the custody tables in `pool`'s database.
    pub fn new(pool: SqlitePool) -> Self {
        SqliteAdmin {
            outbox: SqliteOutbox::new(pool.clone()),
            inbox: SqliteInbox::new(pool.clone()),
            pool,
        }
    }
}

impl Admin for SqliteAdmin {
    fn backend(&self) -> &'static str {
        DRIVER.name
    }
    fn dead_letters(&self) -> BoxFuture<'_, Result<Vec<NumberedDeadLetter>>> {
        Box::pin(crate::dead_letter_rows(&self.pool))
    }
    fn redrive<'a>(
        &'a self,
        seqs: &'a [i64],
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<RedriveOutcome>> {
        Box::pin(crate::redrive(&self.pool, seqs, now))
    }
    fn purge<'a>(&'a self, seqs: &'a [i64]) -> BoxFuture<'a, Result<u64>> {
        Box::pin(crate::purge(&self.pool, seqs))
    }
    fn status(&self, id: Uuid) -> BoxFuture<'_, Result<MessageStatus>> {
        Box::pin(crate::status(&self.pool, id))
    }
    fn checkpoint<'a>(&'a self, subscription: &'a str) -> BoxFuture<'a, Result<Option<i64>>> {
        Box::pin(checkpoint(&self.pool, subscription))
    }
    fn rewind_checkpoint<'a>(
        &'a self,
        subscription: &'a str,
        ids: &'a [Uuid],
    ) -> BoxFuture<'a, Result<Option<i64>>> {
        Box::pin(crate::rewind_checkpoint(&self.pool, subscription, ids))
    }
    fn topic_seen<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(crate::topic_seen(&self.pool, topic))
    }
    fn consumer_seen<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(crate::consumer_seen(&self.pool, name))
    }
    fn topics(&self, limit: u32) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(crate::topics(&self.pool, limit))
    }
    fn consumers(&self, limit: u32) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(crate::consumers(&self.pool, limit))
    }
    fn accept_gap<'a>(
        &'a self,
        consumer: &'a str,
        gap: &'a GapAcceptance,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<AcceptedGap>> {
        Box::pin(self.inbox.accept_gap(consumer, gap, now))
    }
    fn sent(&self) -> &dyn DynSentHistory {
        &self.outbox
    }
    fn processed(&self) -> &dyn DynProcessedHistory {
        &self.inbox
    }
}
