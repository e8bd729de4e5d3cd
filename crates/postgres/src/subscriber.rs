//! The embedded transport: a subscriber that reads the producer's outbox as
//! a log, by position, from a stored checkpoint.

use std::collections::HashMap;
use std::time::Duration;

use custody_core::{Delivery, Result, Subscriber};
use sqlx::{PgPool, Row};
use tokio::time::Instant;

use crate::error::db;
use crate::row::{outbox_columns, OutboxRow};
use crate::wake::{Waiter, Wake};

/// How often [`PgEmbeddedSubscriber::fetch`] looks again when no NOTIFY came.
const POLL: Duration = Duration::from_millis(50);

/// Reads the outbox of the database it is connected to, for some topics, in
/// (transaction id, position) order: position order within a transaction,
/// transactions in the order of their ids (see the comment on the query for
/// why not plain position order). Acknowledgements move a stored checkpoint
/// forward; tokens are outbox positions.
///
/// Delivery is at least once: after a restart, everything after the
/// checkpoint is delivered again.
pub struct PgEmbeddedSubscriber {
    pool: PgPool,
    subscription: String,
    topics: Vec<String>,
    /// (txid, position) of the last row handed out.
    cursor: (i64, i64),
    /// txid of each delivered, not yet acknowledged position.
    pending: HashMap<i64, i64>,
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

// Invariant 5 (no skipped commits). Positions are assigned at insert, so a
// row at a lower position can become visible after a higher one was read,
// and reading `position > cursor` would pass it over for good.
//
// The guard `txid < pg_snapshot_xmin(pg_current_snapshot())` only takes rows
// of transactions that ended before every transaction still running began.
// That alone is not enough in position order: a transaction that got its
// xid earlier (say by a business write) can insert its outbox row *after* a
// younger, still running transaction took a lower position; its row is below
// xmin and visible while the lower position is not. So readers go in
// (txid, position) order with a (txid, position) cursor: every transaction
// that can still commit has txid >= xmin, above every row returned, so
// nothing can later appear behind the cursor. Rows of one transaction keep
// their position order. (The relay's fetch_batch has no cursor, it takes
// status = 0 rows, so the plain guard suffices there.)
const FETCH_TOPICS: &str = concat!(
    "SELECT ",
    outbox_columns!(),
    ", o.txid::text::bigint
FROM custody_outbox o
WHERE o.topic = ANY($3)
  AND (o.txid, o.position) > ($1::bigint::text::xid8, $2)
  AND o.txid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY o.txid, o.position
LIMIT $4"
);

/// Same, every topic (the subscriber was given none).
const FETCH_ALL: &str = concat!(
    "SELECT ",
    outbox_columns!(),
    ", o.txid::text::bigint
FROM custody_outbox o
WHERE (o.txid, o.position) > ($1::bigint::text::xid8, $2)
  AND o.txid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY o.txid, o.position
LIMIT $4"
);

impl PgEmbeddedSubscriber {
    /// A subscriber named `subscription` reading `topics` (all topics when
    /// empty) from the outbox in `pool`'s database, starting after its stored
    /// checkpoint (from the beginning when it has none).
    pub async fn new(pool: PgPool, subscription: &str, topics: &[String]) -> Result<Self> {
        let cursor = sqlx::query_as::<_, (i64, i64)>(
            "SELECT txid::text::bigint, position FROM custody_checkpoint WHERE subscription = $1",
        )
        .bind(subscription)
        .fetch_optional(&pool)
        .await
        .map_err(db("read checkpoint"))?
        .unwrap_or((0, 0));
        let waiter = Waiter::new(Wake::new(pool.clone()));
        Ok(PgEmbeddedSubscriber {
            pool,
            subscription: subscription.to_owned(),
            topics: topics.to_vec(),
            cursor,
            pending: HashMap::new(),
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
        let rows = sqlx::query(sql)
            .bind(self.cursor.0)
            .bind(self.cursor.1)
            .bind(&self.topics)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db(OP))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let txid: i64 = row.try_get(12).map_err(db(OP))?;
            let row = OutboxRow::from_row(row).map_err(db(OP))?;
            let position = row.position;
            self.cursor = (txid, position);
            self.pending.insert(position, txid);
            out.push(Delivery {
                message: row.into_message(),
                delivery_count: 1,
                token: position,
            });
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
        match self.pending.remove(&token) {
            Some(txid) => store_checkpoint(&self.pool, &self.subscription, txid, token).await,
            None => set_checkpoint(&self.pool, &self.subscription, token).await,
        }
    }

    /// One checkpoint write for a batch: the last token in delivery
    /// (`(txid, position)`) order covers the ones before it.
    async fn ack_all(&mut self, tokens: Vec<i64>) -> Result<()> {
        let Some(last) = tokens.last().copied() else {
            return Ok(());
        };
        for t in &tokens[..tokens.len() - 1] {
            self.pending.remove(t);
        }
        self.ack(last).await
    }
}

// The checkpoint only moves forward in the readers' (txid, position) order.
const STORE_CHECKPOINT: &str = "\
INSERT INTO custody_checkpoint (subscription, position, txid, updated_at)
VALUES ($1, $2, $3::bigint::text::xid8, now())
ON CONFLICT (subscription) DO UPDATE
SET position = EXCLUDED.position, txid = EXCLUDED.txid, updated_at = now()
WHERE (custody_checkpoint.txid, custody_checkpoint.position) < (EXCLUDED.txid, EXCLUDED.position)";

async fn store_checkpoint(
    pool: &PgPool,
    subscription: &str,
    txid: i64,
    position: i64,
) -> Result<()> {
    sqlx::query(STORE_CHECKPOINT)
        .bind(subscription)
        .bind(position)
        .bind(txid)
        .execute(pool)
        .await
        .map_err(db("store checkpoint"))?;
    Ok(())
}

/// Store `position` as `subscription`'s checkpoint, unless it already is
/// further (the checkpoint never moves back).
///
/// Readers go in (transaction id, position) order (see
/// [`PgEmbeddedSubscriber`]); the checkpoint takes the transaction id of the
/// outbox row at `position` (or, when there is none, the highest one at or
/// below it).
pub async fn set_checkpoint(pool: &PgPool, subscription: &str, position: i64) -> Result<()> {
    let txid: i64 = sqlx::query_scalar(
        "SELECT COALESCE(
             (SELECT txid FROM custody_outbox WHERE position = $1),
             (SELECT max(txid) FROM custody_outbox WHERE position <= $1),
             '0'::xid8)::text::bigint",
    )
    .bind(position)
    .fetch_one(pool)
    .await
    .map_err(db("store checkpoint"))?;
    store_checkpoint(pool, subscription, txid, position).await
}

/// `subscription`'s stored checkpoint, if it has one.
pub async fn checkpoint(pool: &PgPool, subscription: &str) -> Result<Option<i64>> {
    sqlx::query_scalar("SELECT position FROM custody_checkpoint WHERE subscription = $1")
        .bind(subscription)
        .fetch_optional(pool)
        .await
        .map_err(db("read checkpoint"))
}
