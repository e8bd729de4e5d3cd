use std::future::Future;
use std::time::Duration;

use uuid::Uuid;

use crate::{Message, Result};

/// The transport's durable acknowledgement of a published message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PublishAck {
    /// Stream / exchange / table that stored it.
    pub stream: Option<String>,
    /// The transport's sequence number for it, where it has one.
    pub sequence: Option<u64>,
    /// The transport recognised the id and did not store it again.
    pub duplicate: bool,
}

/// Sends messages to a transport. `publish` returns only once the transport
/// has durably accepted the message (JetStream PubAck, AMQP confirm, ...):
/// the relay marks a message published on that ack and never before.
pub trait Publisher: Send + Sync + 'static {
    /// Publish one message and wait for the durable ack.
    ///
    /// Implementations must use `message.id` as the transport's deduplication
    /// id where the transport has one. Errors say whether a retry can help
    /// ([`crate::Error::retryable`]).
    fn publish(&self, message: &Message) -> impl Future<Output = Result<PublishAck>> + Send;

    /// Publish `message` again after a repair or redrive (`generation` ≥ 1
    /// counts the times). Transports that deduplicate by id must use a
    /// dedupe id that differs per generation (NATS: `<id>:r<generation>`),
    /// or the republish of a message the transport saw within its duplicate
    /// window would be dropped; consumers still deduplicate by
    /// `message.id` in their inbox. The default publishes as usual.
    fn publish_again(
        &self,
        message: &Message,
        generation: u32,
    ) -> impl Future<Output = Result<PublishAck>> + Send {
        let _ = generation;
        self.publish(message)
    }
}

impl PublishAck {
    /// A short reference to where the transport stored the message
    /// (`stream:sequence`), kept in the outbox for tracing.
    pub fn reference(&self) -> Option<String> {
        match (&self.stream, self.sequence) {
            (Some(s), Some(n)) => Some(format!("{s}:{n}")),
            (Some(s), None) => Some(s.clone()),
            (None, Some(n)) => Some(n.to_string()),
            (None, None) => None,
        }
    }
}

/// A message that arrived but could not be turned into a [`Message`]:
/// missing attributes, bad encoding. The consumer dead-letters it with
/// `reason` and acknowledges it, so it never blocks the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// The message id, if it could be read.
    pub id: Option<Uuid>,
    /// The topic or subject it arrived on.
    pub topic: String,
    /// The raw bytes.
    pub payload: Vec<u8>,
    /// What was wrong.
    pub reason: String,
}

/// One received message and the token that acknowledges it.
#[derive(Debug)]
pub struct Delivery<T> {
    /// The decoded message, or what was wrong with it.
    pub message: std::result::Result<Message, Malformed>,
    /// How many times the transport has delivered it (1 = first time), where known.
    pub delivery_count: u32,
    /// Passed back to [`Subscriber::ack`].
    pub token: T,
}

/// Receives messages from a transport, at least once, in order per key.
/// A message not acknowledged is delivered again (after a restart at the latest).
pub trait Subscriber: Send + 'static {
    /// Acknowledgement token of one delivery.
    type Token: Send + 'static;

    /// Up to `max` messages; waits at most `wait` for the first one and
    /// returns an empty batch when none came.
    fn fetch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<Delivery<Self::Token>>>> + Send;

    /// Acknowledge a delivery: the transport will not deliver it again.
    /// The consumer calls this only after its own transaction committed.
    fn ack(&mut self, token: Self::Token) -> impl Future<Output = Result<()>> + Send;

    /// Acknowledge several deliveries, given in delivery order, after one
    /// commit. The default acks each; a log-based transport acks only the
    /// last (its position covers the ones before).
    fn ack_all(&mut self, tokens: Vec<Self::Token>) -> impl Future<Output = Result<()>> + Send {
        async move {
            for t in tokens {
                self.ack(t).await?;
            }
            Ok(())
        }
    }
}
