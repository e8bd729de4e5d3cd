//! The embedded transport: consumers read the producer's outbox directly.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use custody_core::{Delivery, Result, Subscriber};
use sqlx::SqlitePool;
use tokio::time::Instant;

use crate::admin::advance_checkpoint;
use crate::error::map_err;
use crate::outbox::Signal;
use crate::row::{outbox_columns, OutboxRow};
use crate::SqliteOutbox;

const DEFAULT_POLL: Duration = Duration::from_millis(50);

/// A reader of the outbox log: every row of its topics, in position order,
/// whatever the relay did with it, from a stored checkpoint.
///
/// No visibility guard is needed: SQLite commits write transactions one at a
/// time, in position order (see the crate docs). Delivery is at least once:
/// rows fetched but not acknowledged come again after a restart.
#[derive(Debug)]
pub struct SqliteEmbeddedSubscriber {
    pool: SqlitePool,
    subscription: String,
    /// JSON array of topics; `None` reads every topic.
    topics: Option<String>,
    /// Highest position handed out (not necessarily acknowledged).
    cursor: i64,
    poll_interval: Duration,
    signal: Option<Arc<Signal>>,
}

const READ_ALL: &str = concat!(
    "SELECT ",
    outbox_columns!(),
    " FROM custody_outbox WHERE position > ?1 ORDER BY position LIMIT ?2"
);

const READ_TOPICS: &str = concat!(
    "SELECT ",
    outbox_columns!(),
    " FROM custody_outbox \
     WHERE position > ?1 AND topic IN (SELECT value FROM json_each(?3)) \
     ORDER BY position LIMIT ?2"
);

impl SqliteEmbeddedSubscriber {
    /// A reader of `topics` (every topic if empty) in the outbox on `pool`
    /// (the producer's database), starting after the stored checkpoint of
    /// `subscription` (from the beginning if it has none).
    pub async fn new(pool: SqlitePool, subscription: &str, topics: &[String]) -> Result<Self> {
        let cursor = crate::checkpoint(&pool, subscription).await?.unwrap_or(0);
        let topics = if topics.is_empty() {
            None
        } else {
            Some(serde_json::to_string(topics).map_err(|e| {
                custody_core::Error::Config(format!("topics do not serialize to JSON: {e}"))
            })?)
        };
        Ok(SqliteEmbeddedSubscriber {
            pool,
            subscription: subscription.to_owned(),
            topics,
            cursor,
            poll_interval: DEFAULT_POLL,
            signal: None,
        })
    }

    /// How often to look for new rows while waiting (default 50 ms).
    #[must_use]
    pub fn with_poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d.max(Duration::from_millis(1));
        self
    }

    /// Also wake as soon as `outbox` (in this process, on the same database)
    /// commits a message, instead of at the next poll.
    #[must_use]
    pub fn with_outbox(mut self, outbox: &SqliteOutbox) -> Self {
        self.signal = Some(outbox.signal());
        self
    }

    /// The subscription name.
    pub fn subscription(&self) -> &str {
        &self.subscription
    }

    async fn read(&self, max: usize) -> Result<Vec<OutboxRow>> {
        const OP: &str = "read outbox log";
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let query = match &self.topics {
            Some(topics) => sqlx::query(READ_TOPICS)
                .bind(self.cursor)
                .bind(limit)
                .bind(topics.as_str()),
            None => sqlx::query(READ_ALL).bind(self.cursor).bind(limit),
        };
        let rows = query.fetch_all(&self.pool).await.map_err(map_err(OP))?;
        rows.iter()
            .map(|r| OutboxRow::decode(r).map_err(map_err(OP)))
            .collect()
    }
}

impl Subscriber for SqliteEmbeddedSubscriber {
    /// The outbox position of the delivered row.
    type Token = i64;

    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery<i64>>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        let signal = self.signal.clone();
        loop {
            // Registered before reading, so a commit between the read and
            // the wait still wakes us.
            let notified = signal.as_ref().map(|s| s.notified());
            let mut notified = std::pin::pin!(notified);
            if let Some(n) = notified.as_mut().as_pin_mut() {
                n.enable();
            }
            let rows = self.read(max).await?;
            if let Some(last) = rows.last() {
                self.cursor = last.position;
                return Ok(rows
                    .into_iter()
                    .map(|r| Delivery {
                        message: r.message,
                        delivery_count: 1,
                        token: r.position,
                    })
                    .collect());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let nap = self.poll_interval.min(deadline - now);
            match notified.as_mut().as_pin_mut() {
                Some(n) => {
                    let woken = tokio::time::timeout(nap, n).await.is_ok();
                    if let (true, Some(s)) = (woken, &signal) {
                        s.await_visible(&self.pool, deadline).await;
                    }
                }
                None => tokio::time::sleep(nap).await,
            }
        }
    }

    /// Persist the checkpoint as `max(stored, position)`: acknowledging out
    /// of order never moves it back.
    async fn ack(&mut self, position: i64) -> Result<()> {
        advance_checkpoint(&self.pool, &self.subscription, position, Utc::now()).await
    }

    /// One checkpoint write for a batch: the last position covers the rest.
    async fn ack_all(&mut self, positions: Vec<i64>) -> Result<()> {
        match positions.into_iter().max() {
            Some(p) => self.ack(p).await,
            None => Ok(()),
        }
    }
}
