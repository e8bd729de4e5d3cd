//! The operations port ([`custody_core::Admin`]) over a PostgreSQL
//! database, the driver that opens one by URL, and the dead-letter listing.

use chrono::{DateTime, Utc};
use custody_core::admin::{Access, Admin, BoxFuture, Driver, NumberedDeadLetter};
use custody_core::{
    AcceptedGap, DeadLetter, DynProcessedHistory, DynSentHistory, GapAcceptance, InboxStore,
    MessageStatus, RedriveOutcome, Result,
};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{PgInbox, PgOutbox};

/// The PostgreSQL entry of the backend registry: `postgres://…` and
/// `postgresql://…` URLs.
pub const DRIVER: Driver = Driver {
    name: "postgres",
    forms: &[
        "postgres://user:password@host:port/database",
        "postgresql://…",
    ],
    accepts,
    open,
};

fn accepts(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
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
        Ok(Box::new(PgAdmin::new(pool)) as Box<dyn Admin>)
    })
}

/// Every dead letter in this database (relay's and consumers'), oldest first.
/// [`crate::dead_letter_rows`] without the sequence numbers.
pub async fn dead_letters(pool: &PgPool) -> Result<Vec<DeadLetter>> {
    let rows = crate::dead_letter_rows(pool).await?;
    Ok(rows.into_iter().map(|(_, dead)| dead).collect())
}

/// [`custody_core::Admin`] over one PostgreSQL database.
pub struct PgAdmin {
    pool: PgPool,
    outbox: PgOutbox,
    inbox: PgInbox,
}

impl PgAdmin {
    /// Operations over the custody tables in `pool`'s database.
    pub fn new(pool: PgPool) -> Self {
        PgAdmin {
            outbox: PgOutbox::new(pool.clone()),
            inbox: PgInbox::new(pool.clone()),
            pool,
        }
    }
}

impl Admin for PgAdmin {
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
        Box::pin(crate::checkpoint(&self.pool, subscription))
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
