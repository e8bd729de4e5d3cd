//! Outbox rows to messages.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use custody_core::{Malformed, Message, MessageKind};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

/// Columns every outbox reader selects, in [`OutboxRow`] order. A macro so
/// that queries are assembled with `concat!` at compile time.
macro_rules! outbox_columns {
    () => {
        "o.position, o.partition, o.attempts, o.id, o.kind, o.topic, o.msg_key, \
         o.message_type, o.content_type, o.headers, o.payload, o.created_at"
    };
}
pub(crate) use outbox_columns;

/// One outbox row as stored, before it is checked to be a valid message.
pub(crate) struct OutboxRow {
    pub(crate) position: i64,
    pub(crate) partition: i32,
    pub(crate) attempts: i32,
    pub(crate) id: Uuid,
    pub(crate) kind: String,
    pub(crate) topic: String,
    pub(crate) key: String,
    pub(crate) message_type: String,
    pub(crate) content_type: String,
    pub(crate) headers: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) created_at: DateTime<Utc>,
}

impl OutboxRow {
    pub(crate) fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(OutboxRow {
            position: row.try_get(0)?,
            partition: row.try_get(1)?,
            attempts: row.try_get(2)?,
            id: row.try_get(3)?,
            kind: row.try_get(4)?,
            topic: row.try_get(5)?,
            key: row.try_get(6)?,
            message_type: row.try_get(7)?,
            content_type: row.try_get(8)?,
            headers: row.try_get(9)?,
            payload: row.try_get(10)?,
            created_at: row.try_get(11)?,
        })
    }

    /// The message, or what is wrong with the row (written by hand or by
    /// another language's producer: bad headers JSON, unknown kind).
    pub(crate) fn into_message(self) -> Result<Message, Malformed> {
        let headers = match serde_json::from_str::<BTreeMap<String, String>>(&self.headers) {
            Ok(h) => h,
            Err(e) => {
                let reason = format!(
                    "headers column is not a JSON object of strings ({e}); fix the producer that wrote outbox row {}",
                    self.position
                );
                return Err(self.malformed(reason));
            }
        };
        let kind = match self.kind.parse::<MessageKind>() {
            Ok(k) => k,
            Err(e) => return Err(self.malformed(e.to_string())),
        };
        let msg = Message {
            id: self.id,
            kind,
            topic: self.topic,
            key: self.key,
            message_type: self.message_type,
            content_type: self.content_type,
            payload: self.payload,
            headers,
            created_at: self.created_at,
        };
        match msg.validate() {
            Ok(()) => Ok(msg),
            Err(e) => Err(Malformed {
                id: Some(msg.id),
                topic: msg.topic,
                payload: msg.payload,
                reason: e.to_string(),
            }),
        }
    }

    fn malformed(self, reason: String) -> Malformed {
        Malformed {
            id: Some(self.id),
            topic: self.topic,
            payload: self.payload,
            reason,
        }
    }
}
