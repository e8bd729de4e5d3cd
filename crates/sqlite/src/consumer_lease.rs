//! The consumer lease ([`custody_core::lease`]) on SQLite.
//!
//! The fence needs no row lock here: every inbox transaction begins with
//! `BEGIN IMMEDIATE` ([`SqliteInbox`]'s `begin`), so it holds the database's
//! write lock from its first statement, the lease check, to its commit. A
//! takeover is a write, so it waits for that transaction to end (busy
//! timeout) and every transaction the old holder begins after it sees the
//! new epoch and fails.

use std::time::Duration;

use chrono::{DateTime, Utc};
use custody_core::{ConsumerLease, ConsumerLeaseStore, LeaseLost, Result};

use crate::error::map_err;
use crate::{duration_ms, to_ms, SqliteInbox};

// Takeover: free when never held, released (holder NULL) or expired by the
// caller's clock. The upsert runs under the write lock, so no inbox
// transaction of the current holder is in flight while it decides.
const ACQUIRE: &str = "\
INSERT INTO custody_consumer_lease AS l (consumer, holder, epoch, expires_at, taken_at)
VALUES (?1, ?2, 1, ?3, ?4)
ON CONFLICT (consumer) DO UPDATE
    SET holder = excluded.holder, epoch = l.epoch + 1,
        expires_at = excluded.expires_at, taken_at = excluded.taken_at
    WHERE l.holder IS NULL OR l.expires_at IS NULL OR l.expires_at <= ?4
RETURNING epoch";

const RENEW: &str = "\
UPDATE custody_consumer_lease SET expires_at = ?4
WHERE consumer = ?1 AND holder = ?2 AND epoch = ?3";

const RELEASE: &str = "\
UPDATE custody_consumer_lease SET holder = NULL, expires_at = NULL
WHERE consumer = ?1 AND holder = ?2 AND epoch = ?3";

// The fence, first statement of each of the holder's inbox transactions
// (BEGIN IMMEDIATE: the write lock is already held).
const CHECK: &str = "SELECT holder, epoch FROM custody_consumer_lease WHERE consumer = ?1";

fn expiry(now: DateTime<Utc>, ttl: Duration) -> i64 {
    to_ms(now).saturating_add(duration_ms(ttl))
}

impl ConsumerLeaseStore for SqliteInbox {
    async fn acquire_consumer_lease(
        &self,
        consumer: &str,
        holder: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<ConsumerLease>> {
        let epoch: Option<i64> = sqlx::query_scalar(ACQUIRE)
            .bind(consumer)
            .bind(holder)
            .bind(expiry(now, ttl))
            .bind(to_ms(now))
            .fetch_optional(self.pool())
            .await
            .map_err(map_err("acquire consumer lease"))?;
        Ok(epoch.map(|epoch| ConsumerLease {
            consumer: consumer.to_owned(),
            holder: holder.to_owned(),
            epoch,
        }))
    }

    async fn renew_consumer_lease(
        &self,
        lease: &ConsumerLease,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let done = sqlx::query(RENEW)
            .bind(&lease.consumer)
            .bind(&lease.holder)
            .bind(lease.epoch)
            .bind(expiry(now, ttl))
            .execute(self.pool())
            .await
            .map_err(map_err("renew consumer lease"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_consumer_lease(&self, lease: &ConsumerLease) -> Result<()> {
        sqlx::query(RELEASE)
            .bind(&lease.consumer)
            .bind(&lease.holder)
            .bind(lease.epoch)
            .execute(self.pool())
            .await
            .map_err(map_err("release consumer lease"))?;
        Ok(())
    }

    async fn check_consumer_lease(&self, tx: &mut Self::Tx, lease: &ConsumerLease) -> Result<()> {
        let row: Option<(Option<String>, i64)> = sqlx::query_as(CHECK)
            .bind(&lease.consumer)
            .fetch_optional(&mut **tx)
            .await
            .map_err(map_err("check consumer lease"))?;
        LeaseLost::check("sqlite", lease, row)
    }
}
