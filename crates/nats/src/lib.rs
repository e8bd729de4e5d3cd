//! custody-nats: NATS JetStream as a custody transport (not for direct use;
//! see `custody`).
//!
//! [`NatsPublisher`] implements [`custody_core::Publisher`]: a publish
//! returns once JetStream stored the message (PubAck), with the message id as
//! `Nats-Msg-Id` so retries inside the stream's duplicate window are dropped
//! by the server. [`NatsSubscriber`] implements [`custody_core::Subscriber`]
//! over a durable pull consumer with explicit, server-confirmed acks.
//! Messages travel in CloudEvents 1.0 binary mode ([`encode_headers`],
//! [`decode`]), so non-custody consumers can read them.
//!
//! ```no_run
//! use std::time::Duration;
//! use custody_core::{Message, Publisher, Subscriber};
//! use custody_nats::{connect, ensure_stream, NatsPublisher, NatsSubscriber, StreamSpec};
//!
//! # async fn run() -> custody_core::Result<()> {
//! let client = connect("nats://127.0.0.1:4222").await?;
//! let spec = StreamSpec::new("CUSTODY", "custody");
//! ensure_stream(&client, &spec).await?;
//!
//! let publisher = NatsPublisher::new(client.clone(), &spec);
//! let msg = Message::builder("orders", "order-1", "OrderPlaced")
//!     .payload("application/json", br#"{"amount":990}"#.to_vec())
//!     .build()?;
//! let ack = publisher.publish(&msg).await?; // stored by JetStream
//! assert!(!ack.duplicate);
//!
//! let mut subscriber =
//!     NatsSubscriber::new(client, &spec, "billing", &["orders".to_owned()]).await?;
//! for delivery in subscriber.fetch(100, Duration::from_secs(1)).await? {
//!     match &delivery.message {
//!         Ok(m) => println!("{} {}", m.message_type, m.id),
//!         Err(bad) => eprintln!("dead-letter: {}", bad.reason),
//!     }
//!     subscriber.ack(delivery.token).await?; // after the consumer's transaction
//! }
//! # Ok(()) }
//! ```
//!
//! Errors are [`custody_core::Error::Transport`] with transport `"nats"`;
//! their source is a [`NatsError`], and [`custody_core::Error::retryable`]
//! follows [`NatsError::retryable`]: timeouts, a server that is down or
//! restarting and missing responders are retryable; a payload above the
//! server's `max_payload` or a bad subject is not.
#![forbid(unsafe_code)]

mod codec;
mod connect;
mod direct;
mod error;
mod publisher;
mod stream;
mod subscriber;

pub use async_nats::Client;
pub use codec::{
    decode, encode_headers, CE_CUSTODYKIND, CE_CUSTODYTOPIC, CE_ID, CE_PARTITIONKEY, CE_SOURCE,
    CE_SPECVERSION, CE_SUBJECT, CE_TIME, CE_TYPE, CONTENT_TYPE, SOURCE, SPECVERSION,
};
pub use connect::{connect_with, ConnectOptions};
pub use error::NatsError;
pub use publisher::{republish_id, NatsPublisher, DEFAULT_ACK_TIMEOUT};
pub use stream::{connect, ensure_stream, StreamSpec};
pub use subscriber::{NatsAckToken, NatsSubscriber, SubscriberOptions};
