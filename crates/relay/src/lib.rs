//! custody-relay: the engines that move messages, generic over the store and
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
//! - [`reconcile::reconcile`] compares a producer's outbox history with a
//!   consumer's inbox per time window (digests first, ids only where they
//!   differ).
//!
//! ```
//! use custody_relay::{RelayConfig, ConsumerConfig};
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
pub mod metric_definitions;
pub mod reconcile;
mod relay;

pub use consumer::{Consumer, ConsumerConfig, ConsumerStats};
pub use relay::{Relay, RelayConfig, RelayStats};

/// Cancellation handle used to stop engines gracefully.
pub use tokio_util::sync::CancellationToken;
