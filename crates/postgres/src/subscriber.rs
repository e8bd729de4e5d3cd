//! The embedded transport: a subscriber that reads the producer's outbox as
//! a log, by position, from a stored checkpoint.

use std::time::Duration;

use custody_core::{Delivery, Result, Subscriber};
use sqlx::PgPool;
use tokio::time::Instant;

use crate::error::db;
use crate::row::{OutboxRow, COLUMNS};
use crate::wake::{Waiter, Wake};

/// How often [`PgEmbeddedSubscriber::fetch`] looks again when no NOTIFY came.
const POLL: Duration = Duration::from_millis(50);

/// Reads the outbox of the database it is connected to, in position order,
/// for some topics; acknowledgements move a stored checkpoint forward.
///
/// Delivery is at least once: after a restart, everything after the
/// checkpoint is delivered again.
pub struct PgEmbeddedSubscriber {
    pool: PgPool,
    subscription: String,
    topics: Vec<String>,
    cursor: i64,
    waiter: Waiter,
}

impl std::fmt::Debug for PgEmbeddedSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEmbeddedSubscriber")
            .field("subscription", &self.subscription)
            .field("topics", &self.topics)
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

// Invariant 5 (no skipped commits): positions are assigned at insert, so a
// row at a lower position can become visible after a higher one was read.
// Reading `position > cursor` alone would then move the cursor past it for
// good. The guard `txid < pg_snapshot_xmin(pg_current_snapshot())` only takes
// rows of transactions that ended before every transaction still running
// began; a late committer's row stays out of the result until it and every
// older transaction have ended, and the rows after it wait with it.
const FETCH_TOPICS: &str = "\
SELECT {COLUMNS}
FROM custody_outbox o
WHERE o.topic = ANY($2) AND o.position > $1
  AND o.txid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY o.position
LIMIT $3";

/// Same, every topic (the subscriber was given none).
const FETCH_ALL: &str = "\
SELECT {COLUMNS}
FROM custody_outbox o
WHERE o.position > $1
  AND o.txid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY o.position
LIMIT $3";

impl PgEmbeddedSubscriber {
    /// A subscriber named `subscription` reading `topics` (all topics when
    /// empty) from the outbox in `pool`'s database, starting after its stored
    /// checkpoint (from the beginning when it has none).
    pub async fn new(pool: PgPool, subscription: &str, topics: &[String]) -> Result<Self> {
        let cursor = checkpoint(&pool, subscription).await?.unwrap_or(0);
        let waiter = Waiter::new(Wake::new(pool.clone()));
        Ok(PgEmbeddedSubscriber {
            pool,
            subscription: subscription.to_owned(),
            topics: topics.to_vec(),
            cursor,
            waiter,
        })
    }

    async fn fetch_once(&mut self, max: usize) -> Result<Vec<Delivery<i64>>> {
        const OP: &str = "fetch embedded subscription";
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let sql = if self.topics.is_empty() {
            FETCH_ALL
        } else {
            FETCH_TOPICS
        };
        let rows = sqlx::query(&sql.replace("{COLUMNS}", COLUMNS))
            .bind(self.cursor)
            .bind(&self.topics)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db(OP))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let row = OutboxRow::from_row(row).map_err(db(OP))?;
            let position = row.position;
            out.push(Delivery {
                message: row.into_message(),
                delivery_count: 1,
                token: position,
            });
            self.cursor = self.cursor.max(position);
        }
        Ok(out)
    }
}

impl Subscriber for PgEmbeddedSubscriber {
    type Token = i64;

    #[tracing::instrument(skip_all, fields(subscription = %self.subscription))]
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery<i64>>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        loop {
            self.waiter.catch_up();
            let batch = self.fetch_once(max).await?;
            let now = Instant::now();
            if !batch.is_empty() || now >= deadline {
                return Ok(batch);
            }
            self.waiter.wait(POLL.min(deadline - now)).await;
        }
    }

    async fn ack(&mut self, token: i64) -> Result<()> {
        set_checkpoint(&self.pool, &self.subscription, token).await
    }
}

/// Store `position` as `subscription`'s checkpoint, unless it already is
/// further (the checkpoint never moves back).
pub async fn set_checkpoint(pool: &PgPool, subscription: &str, position: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO custody_checkpoint (subscription, position, updated_at) VALUES ($1, $2, now())
         ON CONFLICT (subscription) DO UPDATE
         SET position = GREATEST(custody_checkpoint.position, EXCLUDED.position), updated_at = now()",
    )
    .bind(subscription)
    .bind(position)
    .execute(pool)
    .await
    .map_err(db("store checkpoint"))?;
    Ok(())
}

/// `subscription`'s stored checkpoint, if it has one.
pub async fn checkpoint(pool: &PgPool, subscription: &str) -> Result<Option<i64>> {
    sqlx::query_scalar("SELECT position FROM custody_checkpoint WHERE subscription = $1")
        .bind(subscription)
        .fetch_optional(pool)
        .await
        .map_err(db("read checkpoint"))
}
