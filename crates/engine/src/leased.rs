//! Several instances of one consumer: a single active instance, hot
//! standbys, and a fence on every write of the active one (see
//! [`custody_core::lease`] and docs/OPERATIONS.md).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use custody_core::{
    AcceptedGap, Attempt, Clock, Compaction, ConsumerLease, ConsumerLeaseStore, DeadLetter,
    GapAcceptance, Handler, InboxOutcome, InboxStore, Message, PartitionProgress, Redrive, Result,
    Subscriber, SystemClock,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::{Consumer, ConsumerConfig, ConsumerStats};

/// How instances of one consumer share it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LeaseConfig {
    /// This instance's id; unique per running process (the default is made
    /// of the host name, the process id and a random suffix).
    pub holder: String,
    /// How long a lease lasts without renewal: a standby takes over at most
    /// this long after the active instance died or stalled. Default 10 s.
    #[serde(with = "custody_core::duration_serde")]
    pub ttl: Duration,
    /// How often the active instance renews its lease and a standby tries to
    /// take it. Must be well below `ttl`. Default 2 s.
    #[serde(with = "custody_core::duration_serde")]
    pub renew_interval: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".to_owned());
        LeaseConfig {
            holder: format!(
                "{host}-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ),
            ttl: Duration::from_secs(10),
            renew_interval: Duration::from_secs(2),
        }
    }
}

impl LeaseConfig {
    /// Check the values; the error says which and what to do.
    pub fn validate(&self) -> Result<()> {
        if self.holder.is_empty() {
            return Err(custody_core::Error::Config(
                "consumer lease holder id is empty; leave it unset for a generated one".into(),
            ));
        }
        if self.renew_interval.is_zero() || self.renew_interval * 2 > self.ttl {
            return Err(custody_core::Error::Config(format!(
                "consumer lease renew-interval ({:?}) must be above zero and at most half the ttl ({:?})",
                self.renew_interval, self.ttl
            )));
        }
        Ok(())
    }
}

/// An inbox whose every write runs under the fence of `lease`: inbox
/// transactions check it first thing (and keep the lease row locked until
/// they end), writes that open their own transaction are done while a
/// fenced transaction holds that lock. After a takeover they all fail with
/// a non-retryable error, which stops the [`Consumer`] holding it.
#[derive(Debug, Clone)]
pub struct FencedInbox<I> {
    inner: I,
    lease: Arc<ConsumerLease>,
}

impl<I: ConsumerLeaseStore> FencedInbox<I> {
    /// `inner` fenced by `lease`.
    pub fn new(inner: I, lease: ConsumerLease) -> Self {
        FencedInbox {
            inner,
            lease: Arc::new(lease),
        }
    }

    /// The lease this inbox is fenced by.
    pub fn lease(&self) -> &ConsumerLease {
        &self.lease
    }

    /// Run `write` (a write in a transaction of its own) while a fenced
    /// transaction holds the lease row: no takeover can come in between.
    async fn guarded<T>(&self, write: impl Future<Output = Result<T>>) -> Result<T> {
        let guard = self.begin().await?;
        let out = write.await;
        drop(guard); // rolls back: it wrote nothing
        out
    }
}

impl<I: ConsumerLeaseStore> InboxStore for FencedInbox<I> {
    type Tx = I::Tx;

    async fn begin(&self) -> Result<Self::Tx> {
        let mut tx = self.inner.begin().await?;
        self.inner
            .check_consumer_lease(&mut tx, &self.lease)
            .await?;
        Ok(tx)
    }

    async fn record(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        message: &Message,
        now: DateTime<Utc>,
    ) -> Result<InboxOutcome> {
        self.inner.record(tx, consumer, message, now).await
    }

    async fn record_all(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        messages: &[&Message],
        now: DateTime<Utc>,
    ) -> Result<Vec<InboxOutcome>> {
        self.inner.record_all(tx, consumer, messages, now).await
    }

    async fn commit(&self, tx: Self::Tx) -> Result<()> {
        self.inner.commit(tx).await
    }

    async fn start_attempts(
        &self,
        consumer: &str,
        run: Uuid,
        ids: &[Uuid],
        alone: bool,
        now: DateTime<Utc>,
    ) -> Result<Vec<Attempt>> {
        self.guarded(self.inner.start_attempts(consumer, run, ids, alone, now))
            .await
    }

    async fn finish_attempts(&self, tx: &mut Self::Tx, consumer: &str, ids: &[Uuid]) -> Result<()> {
        self.inner.finish_attempts(tx, consumer, ids).await
    }

    async fn is_recorded(&self, consumer: &str, id: Uuid) -> Result<bool> {
        self.inner.is_recorded(consumer, id).await
    }

    async fn accept_gap(
        &self,
        consumer: &str,
        gap: &GapAcceptance,
        now: DateTime<Utc>,
    ) -> Result<AcceptedGap> {
        self.inner.accept_gap(consumer, gap, now).await
    }

    async fn dead_letter(&self, consumer: &str, dead: &DeadLetter) -> Result<()> {
        self.guarded(self.inner.dead_letter(consumer, dead)).await
    }

    async fn redrives(&self, consumer: &str, limit: usize) -> Result<Vec<Redrive>> {
        self.inner.redrives(consumer, limit).await
    }

    async fn finish_redrive(&self, tx: &mut Self::Tx, seq: i64) -> Result<()> {
        self.inner.finish_redrive(tx, seq).await
    }

    async fn drop_redrive(&self, seq: i64) -> Result<()> {
        self.guarded(self.inner.drop_redrive(seq)).await
    }

    async fn prune(&self, consumer: &str, older_than: DateTime<Utc>, limit: usize) -> Result<u64> {
        self.guarded(self.inner.prune(consumer, older_than, limit))
            .await
    }

    async fn progress(&self, consumer: &str) -> Result<Vec<PartitionProgress>> {
        self.inner.progress(consumer).await
    }

    async fn compact(
        &self,
        consumer: &str,
        keep_after: DateTime<Utc>,
        limit: usize,
    ) -> Result<Compaction> {
        self.guarded(self.inner.compact(consumer, keep_after, limit))
            .await
    }
}

/// Runs one instance of a consumer among several: waits as a hot standby
/// until it holds the consumer's lease, then consumes through a
/// [`FencedInbox`] until it loses the lease (back to standby) or is
/// cancelled (releases the lease so a standby takes over at once).
///
/// The subscriber is made only once the lease is held, so only the active
/// instance ever resets the transport's position (NATS: the durable's
/// resume after its ack floor).
pub struct LeasedConsumer<I, C = SystemClock> {
    inbox: I,
    config: ConsumerConfig,
    lease: LeaseConfig,
    clock: C,
}

impl<I: ConsumerLeaseStore> LeasedConsumer<I, SystemClock> {
    /// An instance of the consumer `config.name` over `inbox`.
    pub fn new(inbox: I, config: ConsumerConfig, lease: LeaseConfig) -> Self {
        LeasedConsumer {
            inbox,
            config,
            lease,
            clock: SystemClock,
        }
    }
}

impl<I: ConsumerLeaseStore, C: Clock + Clone> LeasedConsumer<I, C> {
    /// Use another clock (for the lease's expiry and the consumer).
    pub fn with_clock<C2: Clock + Clone>(self, clock: C2) -> LeasedConsumer<I, C2> {
        LeasedConsumer {
            inbox: self.inbox,
            config: self.config,
            lease: self.lease,
            clock,
        }
    }

    /// Run until `cancel` fires. `subscriber` makes the transport
    /// subscription each time this instance becomes active; `handler` makes
    /// the handler. Returns the counters of every active period; an error
    /// only for terminal failures other than losing the lease.
    pub async fn run<S, H, FS, FutS, FH>(
        self,
        mut subscriber: FS,
        mut handler: FH,
        cancel: CancellationToken,
    ) -> Result<ConsumerStats>
    where
        S: Subscriber,
        H: Handler<I::Tx>,
        FS: FnMut() -> FutS,
        FutS: Future<Output = Result<S>>,
        FH: FnMut() -> H,
    {
        self.lease.validate()?;
        let name = self.config.name.clone();
        let holder = self.lease.holder.clone();
        let mut total = ConsumerStats::default();
        let mut standby_logged = false;
        while !cancel.is_cancelled() {
            let acquired = self
                .inbox
                .acquire_consumer_lease(&name, &holder, self.lease.ttl, self.clock.now())
                .await;
            let lease = match acquired {
                Ok(Some(lease)) => lease,
                Ok(None) => {
                    if !standby_logged {
                        info!(consumer = %name, holder = %holder, "another instance is active; standing by");
                        standby_logged = true;
                    }
                    if !sleep(self.lease.renew_interval, &cancel).await {
                        break;
                    }
                    continue;
                }
                Err(e) if e.retryable() => {
                    warn!(consumer = %name, error = %e, "cannot reach the consumer lease; retrying");
                    if !sleep(self.lease.renew_interval, &cancel).await {
                        break;
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            standby_logged = false;
            info!(consumer = %name, holder = %holder, epoch = lease.epoch, "took the consumer lease; active");
            let stats = self
                .active(lease, &mut subscriber, &mut handler, &cancel)
                .await?;
            add(&mut total, &stats);
        }
        Ok(total)
    }

    /// One active period: consume under `lease` until cancelled or fenced off.
    async fn active<S, H, FS, FutS, FH>(
        &self,
        lease: ConsumerLease,
        subscriber: &mut FS,
        handler: &mut FH,
        cancel: &CancellationToken,
    ) -> Result<ConsumerStats>
    where
        S: Subscriber,
        H: Handler<I::Tx>,
        FS: FnMut() -> FutS,
        FutS: Future<Output = Result<S>>,
        FH: FnMut() -> H,
    {
        let active = cancel.child_token();
        // Aborted also when this future is dropped (the caller gave up on
        // it): a renewal outliving its consumer would hold the lease forever.
        let mut renewal = AbortOnDrop(tokio::spawn(renew(
            self.inbox.clone(),
            lease.clone(),
            self.lease.clone(),
            self.clock.clone(),
            active.clone(),
        )));
        let outcome = match subscriber().await {
            Ok(sub) => {
                let inbox = FencedInbox::new(self.inbox.clone(), lease.clone());
                Consumer::new(inbox, sub, handler(), self.config.clone())
                    .with_clock(self.clock.clone())
                    .run(active.clone())
                    .await
            }
            Err(e) => Err(e),
        };
        active.cancel();
        let _ = (&mut renewal.0).await;
        let still_held = self
            .inbox
            .renew_consumer_lease(&lease, self.lease.ttl, self.clock.now())
            .await
            .unwrap_or(false);
        if cancel.is_cancelled() && still_held {
            if let Err(e) = self.inbox.release_consumer_lease(&lease).await {
                warn!(consumer = %lease.consumer, error = %e, "could not release the consumer lease; a standby takes over when it expires");
            }
        }
        match outcome {
            Ok(stats) => Ok(stats),
            Err(e) if !still_held || e.retryable() => {
                warn!(consumer = %lease.consumer, epoch = lease.epoch, error = %e, "lost the consumer lease; standing by");
                Ok(ConsumerStats::default())
            }
            Err(e) => {
                if let Err(r) = self.inbox.release_consumer_lease(&lease).await {
                    warn!(consumer = %lease.consumer, error = %r, "could not release the consumer lease");
                }
                Err(e)
            }
        }
    }
}

/// Renew `lease` every `renew_interval` until `active` is cancelled; cancel
/// `active` when the lease was taken over.
async fn renew<I: ConsumerLeaseStore, C: Clock>(
    inbox: I,
    lease: ConsumerLease,
    config: LeaseConfig,
    clock: C,
    active: CancellationToken,
) {
    while sleep(config.renew_interval, &active).await {
        match inbox
            .renew_consumer_lease(&lease, config.ttl, clock.now())
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                warn!(consumer = %lease.consumer, epoch = lease.epoch, "the consumer lease was taken over; stopping");
                active.cancel();
                return;
            }
            Err(e) => {
                warn!(consumer = %lease.consumer, error = %e, "cannot renew the consumer lease; retrying (the fence stops this instance if another takes over)")
            }
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn sleep(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

fn add(total: &mut ConsumerStats, s: &ConsumerStats) {
    total.processed += s.processed;
    total.duplicates += s.duplicates;
    total.dead_lettered += s.dead_lettered;
    total.retries += s.retries;
    total.redriven += s.redriven;
    total.pruned += s.pruned;
    total.skipped += s.skipped;
    total.compacted += s.compacted;
}
