//! custody-engine: the engines that move messages, generic over the store and
//! transport traits of `custody-core`.
//!
//! - [`Relay`] moves committed outbox messages to a [`Publisher`]: in order
//!   per key, batched, with backoff per message, a circuit breaker for the
//!   transport, dead letters, and partition leases so several relays share
//!   one outbox.
//! - [`Consumer`] feeds a [`Subscriber`]'s deliveries to a [`Handler`] inside
//!   the consumer's own transaction together with the inbox row, and
//!   acknowledges the transport only after commit: at-least-once delivery +
//!   inbox = exactly-once effect.
//! - [`Repository`] runs commands on an event-sourced aggregate
//!   (`custody_core::aggregate`): loads it from a snapshot and the events
//!   after it, decides, appends with optimistic concurrency, retries
//!   conflicts a bounded number of times, and recognises a re-run of a
//!   command id.
//! - [`reconcile::reconcile`] compares a producer's outbox history with a
//!   consumer's inbox per time window (digests first, ids only where they
//!   differ).
//!
//! ```
//! use custody_engine::{RelayConfig, ConsumerConfig};
//! let relay = RelayConfig::default();
//! assert_eq!(relay.batch_size, 500);
//! let consumer = ConsumerConfig::new("billing");
//! assert_eq!(consumer.name, "billing");
//! ```
//!
//! [`Publisher`]: custody_core::Publisher
//! [`Subscriber`]: custody_core::Subscriber
//! [`Handler`]: custody_core::Handler
#![forbid(unsafe_code)]

mod consumer;
mod leased;
pub mod live;
pub mod log_relay;
pub mod metric_definitions;
pub mod projection;
pub mod reconcile;
mod relay;
pub mod repository;
mod shutdown;
pub mod subscription;
mod validate;

pub use consumer::{Consumer, ConsumerConfig, ConsumerStats};
pub use leased::{FencedInbox, LeaseConfig, LeasedConsumer};
pub use projection::{Projection, ProjectionConfig, ProjectionRunner, RunnerStatus};
pub use relay::{Relay, RelayConfig, RelayStats};
pub use repository::{Outcome, Repository, RepositoryConfig};
pub use shutdown::shutdown_token;
pub use subscription::{Page, Subscription, SubscriptionConfig};

/// Cancellation handle used to stop engines gracefully.
pub use tokio_util::sync::CancellationToken;

use chrono::{DateTime, Utc};

/// `now + d`, saturating at the end of time (a huge configured interval
/// means "never" rather than an overflow panic).
pub(crate) fn after(now: DateTime<Utc>, d: std::time::Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `now - d`, or `None` when that is before the start of time (nothing is
/// that old, so there is nothing to prune).
pub(crate) fn before(now: DateTime<Utc>, d: std::time::Duration) -> Option<DateTime<Utc>> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
}

/// Call `prune(limit)` until it deletes less than a full batch, at most ten
/// times (so the engine's real work never waits long); returns the total.
pub(crate) async fn prune_in_batches<F, Fut>(
    limit: usize,
    mut prune: F,
) -> custody_core::Result<u64>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = custody_core::Result<u64>>,
{
    let limit = limit.max(1);
    let mut total = 0;
    for _ in 0..10 {
        let n = prune(limit).await?;
        total += n;
        if (n as usize) < limit {
            break;
        }
    }
    Ok(total)
}
