//! Where a message is: the answer to "where is my request?".
//!
//! Each backend reads the custody tables of one database into a
//! [`MessageStatus`] (`custody_sqlite::status`, `custody_postgres::status`);
//! the statuses of several databases (the producer's, each consumer's) are
//! combined with [`MessageStatus::merge`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The message in its producer's outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerSide {
    /// Topic.
    pub topic: String,
    /// Message type.
    pub message_type: String,
    /// Ordering key.
    pub key: String,
    /// Outbox position.
    pub position: i64,
    /// The producer's creation time of the message.
    pub created_at: DateTime<Utc>,
    /// When the producer's transaction inserted it.
    pub enqueued_at: DateTime<Utc>,
    /// `pending`, `published` or `dead`.
    pub status: String,
    /// Failed publish attempts.
    pub attempts: u32,
    /// Parked until (pending messages that failed).
    pub retry_at: Option<DateTime<Utc>>,
    /// Last publish error.
    pub last_error: Option<String>,
    /// When the transport acknowledged it.
    pub published_at: Option<DateTime<Utc>>,
    /// The transport's reference from its ack, e.g. `ORDERS:42` (stream:sequence).
    pub publish_ref: Option<String>,
    /// Times it was sent again by a repair or redrive.
    pub republished: u32,
    /// Its number in its partition and topic (docs/SEQUENCES.md), once the
    /// relay gave it one.
    #[serde(default)]
    pub sequence: Option<u64>,
}

/// The message in one consumer's inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerSide {
    /// Consumer name.
    pub consumer: String,
    /// When its transaction committed the inbox row (or dead-lettered it).
    pub processed_at: DateTime<Utc>,
    /// Redeliveries recognised and skipped.
    pub duplicates: u32,
    /// Whether this consumer dead-lettered it rather than applying it.
    pub dead: bool,
}

/// A dead letter of the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterInfo {
    /// `relay` or `consumer:<name>`.
    pub origin: String,
    /// Why.
    pub error: String,
    /// Attempts made.
    pub attempts: u32,
    /// When.
    pub dead_at: DateTime<Utc>,
}

/// The message waiting in a consumer's redrive queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedriveInfo {
    /// Consumer that will process it again.
    pub consumer: String,
    /// When an operator redrove it.
    pub redriven_at: DateTime<Utc>,
}

/// Everything custody's tables know about one message id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageStatus {
    /// The id.
    pub id: Uuid,
    /// The producer's outbox row, if a database looked at has it (and it was not pruned).
    pub producer: Option<ProducerSide>,
    /// Inbox rows, one per consumer that recorded it.
    pub consumers: Vec<ConsumerSide>,
    /// Dead letters (relay's and consumers').
    pub dead: Vec<DeadLetterInfo>,
    /// Redrives waiting to be processed.
    pub redriving: Vec<RedriveInfo>,
}

/// The summarised stage of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// No database looked at knows the id (never sent, or pruned).
    Unknown,
    /// In the outbox, not yet acknowledged by the transport.
    Pending,
    /// Acknowledged by the transport; no consumer looked at has it yet.
    Published,
    /// Sent back by an operator; the consumer has not processed it again yet.
    Redriving,
    /// Applied by at least one consumer looked at (and dead-lettered by none).
    Processed,
    /// Dead-lettered by the relay or by a consumer.
    Dead,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Unknown => "unknown",
            Stage::Pending => "pending",
            Stage::Published => "published",
            Stage::Redriving => "redriving",
            Stage::Processed => "processed",
            Stage::Dead => "dead",
        })
    }
}

impl MessageStatus {
    /// An empty status for `id`.
    pub fn new(id: Uuid) -> Self {
        MessageStatus {
            id,
            ..Default::default()
        }
    }

    /// Add what another database knows.
    pub fn merge(&mut self, other: MessageStatus) {
        if self.producer.is_none() {
            self.producer = other.producer;
        }
        self.consumers.extend(other.consumers);
        self.dead.extend(other.dead);
        self.redriving.extend(other.redriving);
        self.consumers.sort_by(|a, b| a.consumer.cmp(&b.consumer));
        self.dead.sort_by_key(|d| d.dead_at);
    }

    /// Where the message is now, most advanced state first: dead (still in
    /// a dead-letter table), redriving, processed, published, pending.
    pub fn stage(&self) -> Stage {
        if !self.dead.is_empty() {
            return Stage::Dead;
        }
        if !self.redriving.is_empty() {
            return Stage::Redriving;
        }
        if self.consumers.iter().any(|c| !c.dead) {
            return Stage::Processed;
        }
        match self.producer.as_ref().map(|p| p.status.as_str()) {
            Some("published") => Stage::Published,
            Some("dead") => Stage::Dead,
            Some(_) => Stage::Pending,
            None => Stage::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_follows_the_most_advanced_hop() {
        let mut s = MessageStatus::new(Uuid::nil());
        assert_eq!(s.stage(), Stage::Unknown);
        s.producer = Some(ProducerSide {
            topic: "t".into(),
            message_type: "T".into(),
            key: "k".into(),
            position: 1,
            created_at: Utc::now(),
            enqueued_at: Utc::now(),
            status: "pending".into(),
            attempts: 0,
            retry_at: None,
            last_error: None,
            published_at: None,
            publish_ref: None,
            republished: 0,
            sequence: None,
        });
        assert_eq!(s.stage(), Stage::Pending);
        if let Some(p) = s.producer.as_mut() {
            p.status = "published".into();
        }
        assert_eq!(s.stage(), Stage::Published);
        s.consumers.push(ConsumerSide {
            consumer: "b".into(),
            processed_at: Utc::now(),
            duplicates: 0,
            dead: false,
        });
        assert_eq!(s.stage(), Stage::Processed);
        s.dead.push(DeadLetterInfo {
            origin: "consumer:c".into(),
            error: "boom".into(),
            attempts: 1,
            dead_at: Utc::now(),
        });
        assert_eq!(s.stage(), Stage::Dead);
    }
}
