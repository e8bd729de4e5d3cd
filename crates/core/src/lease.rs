//! One active instance per consumer: a lease in the consumer's own database,
//! with a fencing check inside every inbox transaction.
//!
//! Several processes may run the same consumer (a rolling deploy, hot
//! standbys). Only the holder of the consumer's lease fetches from the
//! transport, resets the transport's position and commits inbox rows; the
//! others wait to take it over. Every takeover increments the lease's
//! `epoch`, and every inbox transaction of the holder first checks, under a
//! row lock that a takeover has to wait for, that its epoch is still the
//! current one ([`ConsumerLeaseStore::check_consumer_lease`]). So an instance
//! that was paused past its lease's expiry (a long GC or I/O stall,
//! `SIGSTOP`, a partition from the database) cannot commit anything once
//! another instance took over: the two never apply messages concurrently,
//! and a key's messages are applied in one order.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::{Error, InboxStore, Result};

/// A lease held on one consumer name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerLease {
    /// The consumer's name.
    pub consumer: String,
    /// Who holds it: an id unique to one running instance.
    pub holder: String,
    /// Incremented by every takeover; the fencing token.
    pub epoch: i64,
}

/// A lease store for [`ConsumerLease`]s, in the same database as the inbox
/// so the fencing check runs inside the inbox's own transaction.
pub trait ConsumerLeaseStore: InboxStore {
    /// Take `consumer`'s lease for `holder` until `now + ttl` if it is free
    /// (never taken, released, or expired): a new epoch. `None` while another
    /// holder's lease is still valid. Does not renew: a holder renews with
    /// [`ConsumerLeaseStore::renew_consumer_lease`].
    fn acquire_consumer_lease(
        &self,
        consumer: &str,
        holder: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Option<ConsumerLease>>> + Send;

    /// Extend `lease` to `now + ttl`. `false` when it was taken over (its
    /// epoch is no longer the current one): the holder must stop.
    fn renew_consumer_lease(
        &self,
        lease: &ConsumerLease,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Give `lease` up (graceful shutdown): a standby can take it at once.
    fn release_consumer_lease(
        &self,
        lease: &ConsumerLease,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Inside `tx`: fail unless `lease`'s epoch is still the current one,
    /// and lock the lease row so that no takeover can happen before `tx`
    /// ends. The error is not retryable and names the consumer, holder and
    /// epochs. Expiry is not checked: an expired lease nobody took over
    /// still excludes every other instance.
    fn check_consumer_lease(
        &self,
        tx: &mut Self::Tx,
        lease: &ConsumerLease,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// The fence failed: another instance holds the consumer's lease now
/// (what [`ConsumerLeaseStore::check_consumer_lease`] returns as the source
/// of its non-retryable error).
#[derive(Debug, thiserror::Error)]
#[error(
    "consumer {consumer:?}: this instance ({holder}) held its lease at epoch {epoch}, but {current}; \
     it must stop consuming (another instance took over, most likely after this one stalled past the lease's ttl)"
)]
pub struct LeaseLost {
    consumer: String,
    holder: String,
    epoch: i64,
    current: String,
}

impl LeaseLost {
    /// Compare `lease` with the lease row a store read (`None`: no row;
    /// `Some((None, epoch))`: released): `Ok` when `lease` is still the
    /// current one, else the non-retryable store error for `backend`.
    pub fn check(
        backend: &'static str,
        lease: &ConsumerLease,
        row: Option<(Option<String>, i64)>,
    ) -> Result<()> {
        let current = match row {
            Some((Some(holder), epoch)) if epoch == lease.epoch && holder == lease.holder => {
                return Ok(())
            }
            Some((Some(holder), epoch)) => format!("{holder} holds it at epoch {epoch}"),
            Some((None, epoch)) => format!("it was released at epoch {epoch}"),
            None => "there is no lease row for it".to_owned(),
        };
        Err(Error::store(
            backend,
            "check consumer lease",
            false,
            LeaseLost {
                consumer: lease.consumer.clone(),
                holder: lease.holder.clone(),
                epoch: lease.epoch,
                current,
            },
        ))
    }
}
