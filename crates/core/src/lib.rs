//! custody-core: the message envelope, the store and transport traits, errors
//! and the retry policies shared by every custody crate.
//!
//! This crate has no database and no broker in it. Backends (`custody-sqlite`,
//! `custody-postgres`) implement [`OutboxStore`] and [`InboxStore`];
//! transports (`custody-nats`, the embedded log readers) implement
//! [`Publisher`] and [`Subscriber`]; the engines in `custody-engine` are generic
//! over them. Operations over a database (dead letters, trace, checkpoints,
//! reconcile history) go through one `dyn` port, [`Admin`], which each
//! backend provides with a [`Driver`] that opens it by URL ([`admin`]).
//!
//! ```
//! use custody_core::{Message, MessageKind};
//!
//! #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
//! struct OrderPlaced { order_id: u64, amount_cents: i64 }
//!
//! let msg = Message::builder("orders", "customer-7", "OrderPlaced")
//!     .kind(MessageKind::Event)
//!     .json(&OrderPlaced { order_id: 1, amount_cents: 990 })?
//!     .header(custody_core::headers::CORRELATION_ID, "req-42")?
//!     .build()?;
//! assert_eq!(msg.decode_json::<OrderPlaced>()?.amount_cents, 990);
//! assert_eq!(msg.id.get_version_num(), 7);
//! # Ok::<(), custody_core::Error>(())
//! ```
#![forbid(unsafe_code)]

pub mod admin;
pub mod aggregate;
mod clock;
mod error;
pub mod event;
pub mod history;
pub mod lease;
pub mod log_relay;
mod message;
mod partition;
mod policy;
pub mod projection;
mod secret;
pub mod sequence;
mod status;
mod store;
mod transport;
pub mod upcast;

pub use admin::{
    redact_url, Access, Admin, BoxFuture, Driver, RedriveOutcome, RedriveStep, RedriveTarget,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{BoxError, Error, Result};
pub use history::{
    DynProcessedHistory, DynSentHistory, IdDigest, IdRange, NumberedRow, ProcessedHistory,
    ReconcileQuery, ReconcileReport, SentHistory, SequenceHead,
};
pub use lease::{ConsumerLease, ConsumerLeaseStore, LeaseLost};
pub use message::{
    escape_text, headers, is_json_content_type, storable_text, Message, MessageBuilder,
    MessageKind, CONTENT_TYPE_JSON,
};
pub use partition::{fair_share, partition_for, plan_leases, LeasePlan};
pub use policy::{duration_serde, Backoff, BreakerState, CircuitBreaker, CircuitBreakerConfig};
pub use secret::Secret;
pub use sequence::{AcceptedGap, Compaction, GapAcceptance, GapRange, PartitionProgress, Sequence};
pub use status::{ConsumerSide, DeadLetterInfo, MessageStatus, ProducerSide, RedriveInfo, Stage};
pub use store::{
    keep_numbered, Attempt, DeadLetter, Handler, HandlerError, InboxOutcome, InboxStore,
    OutboxRecord, OutboxStore, Redrive, RowWrite,
};
pub use transport::{Delivery, Malformed, PublishAck, Publisher, Subscriber};
