//! The consumer lease ([`custody_core::lease`]) on PostgreSQL.

use std::time::Duration;

use chrono::{DateTime, Utc};
use custody_core::{ConsumerLease, ConsumerLeaseStore, LeaseLost, Result};

use crate::error::db;
use crate::PgInbox;

// Takeover. The row lock of the conflicting update waits for every inbox
// transaction of the current holder (they hold FOR SHARE on the row, see
// CHECK), then the WHERE is evaluated again on the row as those left it: a
// lease renewed meanwhile is not taken. A lease is free when never held,
// released (holder NULL) or expired by the caller's clock. Clocks of
// different instances may disagree; that only moves the moment of a
// takeover, never lets two holders commit (the epoch does that).
const ACQUIRE: &str = "\
INSERT INTO custody_consumer_lease AS l (consumer, holder, epoch, expires_at, taken_at)
VALUES ($1, $2, 1, $3, $4)
ON CONFLICT (consumer) DO UPDATE
    SET holder = EXCLUDED.holder, epoch = l.epoch + 1,
        expires_at = EXCLUDED.expires_at, taken_at = EXCLUDED.taken_at
    WHERE l.holder IS NULL OR l.expires_at IS NULL OR l.expires_at <= $4
RETURNING epoch";

const RENEW: &str = "\
UPDATE custody_consumer_lease SET expires_at = $4
WHERE consumer = $1 AND holder = $2 AND epoch = $3";

const RELEASE: &str = "\
UPDATE custody_consumer_lease SET holder = NULL, expires_at = NULL
WHERE consumer = $1 AND holder = $2 AND epoch = $3";

// The fence, first statement of each of the holder's inbox transactions.
// FOR SHARE (not FOR KEY SHARE, which an update of non-key columns does not
// wait for) keeps a takeover out until this transaction ends, so what it
// commits is committed before the next holder starts.
const CHECK: &str = "\
SELECT holder, epoch FROM custody_consumer_lease WHERE consumer = $1 FOR SHARE";

fn expiry(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(ttl)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl ConsumerLeaseStore for PgInbox {
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
            .bind(now)
            .fetch_optional(self.pool())
            .await
            .map_err(db("acquire consumer lease"))?;
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
            .map_err(db("renew consumer lease"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_consumer_lease(&self, lease: &ConsumerLease) -> Result<()> {
        sqlx::query(RELEASE)
            .bind(&lease.consumer)
            .bind(&lease.holder)
            .bind(lease.epoch)
            .execute(self.pool())
            .await
            .map_err(db("release consumer lease"))?;
        Ok(())
    }

    async fn check_consumer_lease(&self, tx: &mut Self::Tx, lease: &ConsumerLease) -> Result<()> {
        let row: Option<(Option<String>, i64)> = sqlx::query_as(CHECK)
            .bind(&lease.consumer)
            .fetch_optional(&mut **tx)
            .await
            .map_err(db("check consumer lease"))?;
        LeaseLost::check("postgres", lease, row)
    }
}
