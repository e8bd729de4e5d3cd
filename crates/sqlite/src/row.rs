//! Turning stored outbox rows back into messages. A row can be damaged by
//! hand edits or foreign producers; that must surface as a per-row problem
//! naming the column, never as a failed query.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use custody_core::{Malformed, Message, MessageKind};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use uuid::Uuid;

/// Columns every outbox read selects, by the names [`OutboxRow::decode`]
/// reads. A macro so that queries are assembled with `concat!` at compile time.
macro_rules! outbox_columns {
    () => {
        "position, partition, attempts, id, kind, topic, msg_key, \
         message_type, content_type, headers, payload, created_at, seq"
    };
}
pub(crate) use outbox_columns;

/// One outbox row: the relay's bookkeeping plus the message or what is wrong with it.
pub(crate) struct OutboxRow {
    pub position: i64,
    pub partition: u32,
    pub attempts: u32,
    /// The row's number in its partition (`custody_core::sequence`), once
    /// a relay gave it one. A value that is not a positive integer reads as
    /// none.
    pub seq: Option<u64>,
    pub message: Result<Message, Malformed>,
}

impl OutboxRow {
    /// Decode a row selected with [`outbox_columns!`]. Fails only when the
    /// position itself is unreadable, which SQLite's `INTEGER PRIMARY KEY` rules out.
    pub(crate) fn decode(row: &SqliteRow) -> Result<Self, sqlx::Error> {
        let position: i64 = row.try_get("position")?;
        let partition = row
            .try_get::<i64, _>("partition")
            .ok()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0);
        let attempts = row
            .try_get::<i64, _>("attempts")
            .ok()
            .and_then(|a| u32::try_from(a).ok())
            .unwrap_or(0);
        let seq = row
            .try_get::<Option<i64>, _>("seq")
            .ok()
            .flatten()
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0);
        Ok(OutboxRow {
            position,
            partition,
            attempts,
            seq,
            message: decode_message(row, position),
        })
    }
}

fn decode_message(row: &SqliteRow, position: i64) -> Result<Message, Malformed> {
    let text = |col: &str| -> Result<String, String> {
        row.try_get::<String, _>(col)
            .map_err(|e| format!("column {col} of outbox position {position} is not text: {e}"))
    };
    let id_text = text("id");
    let id = id_text.as_ref().ok().and_then(|s| Uuid::parse_str(s).ok());
    let topic = text("topic").unwrap_or_default();
    let payload = row.try_get::<Vec<u8>, _>("payload");
    let malformed = |reason: String, payload: Vec<u8>| Malformed {
        id,
        topic: topic.clone(),
        payload,
        reason,
    };
    let payload = match payload {
        Ok(p) => p,
        Err(e) => {
            return Err(malformed(
                format!("column payload of outbox position {position} is unreadable: {e}"),
                Vec::new(),
            ))
        }
    };
    let build = || -> Result<Message, String> {
        let topic = text("topic")?;
        let id_text = id_text.clone()?;
        let id = Uuid::parse_str(&id_text).map_err(|e| {
            format!("column id of outbox position {position} is not a uuid ({id_text:?}): {e}")
        })?;
        let kind_text = text("kind")?;
        let kind: MessageKind = kind_text
            .parse()
            .map_err(|e| format!("column kind of outbox position {position}: {e}"))?;
        let headers_text = text("headers")?;
        let headers: BTreeMap<String, String> =
            serde_json::from_str(&headers_text).map_err(|e| {
                format!(
                    "column headers of outbox position {position} is not a JSON object of strings: {e}"
                )
            })?;
        let created_ms: i64 = row.try_get("created_at").map_err(|e| {
            format!("column created_at of outbox position {position} is not an integer: {e}")
        })?;
        let created_at = DateTime::<Utc>::from_timestamp_millis(created_ms).ok_or_else(|| {
            format!("column created_at of outbox position {position} is out of range: {created_ms}")
        })?;
        Ok(Message {
            id,
            kind,
            topic,
            key: text("msg_key")?,
            message_type: text("message_type")?,
            content_type: text("content_type")?,
            payload: Vec::new(),
            headers,
            created_at,
        })
    };
    match build() {
        Ok(mut m) => {
            m.payload = payload;
            Ok(m)
        }
        Err(reason) => Err(malformed(reason, payload)),
    }
}
