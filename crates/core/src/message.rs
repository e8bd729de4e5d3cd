use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Error, Result};

/// Content type of JSON payloads.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Well-known header names. Header names follow the CloudEvents rules for
/// extension attributes (`[a-z0-9]{1,20}`) so that every header maps onto a
/// `ce-<name>` transport header without renaming.
pub mod headers {
    /// Id shared by every message of one business flow.
    pub const CORRELATION_ID: &str = "correlationid";
    /// Id of the message that caused this one.
    pub const CAUSATION_ID: &str = "causationid";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state.
    pub const TRACESTATE: &str = "tracestate";
    /// Topic a reply should be sent to.
    pub const REPLY_TO: &str = "replyto";
    /// Saga instance this message belongs to.
    pub const SAGA_ID: &str = "sagaid";
}

/// What a message means to its receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
    /// Something that happened; any number of consumers.
    #[default]
    Event,
    /// A request for one receiver to do something.
    Command,
    /// The answer to a command.
    Reply,
}

impl MessageKind {
    /// The lowercase name stored in databases and transport headers.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Event => "event",
            MessageKind::Command => "command",
            MessageKind::Reply => "reply",
        }
    }
}

impl std::str::FromStr for MessageKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "event" => Ok(MessageKind::Event),
            "command" => Ok(MessageKind::Command),
            "reply" => Ok(MessageKind::Reply),
            other => Err(Error::InvalidMessage(format!(
                "unknown message kind {other:?}; expected event, command or reply"
            ))),
        }
    }
}

impl std::fmt::Display for MessageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The custody envelope. Attribute names follow CloudEvents 1.0 where they
/// exist: `id`, `type`, `subject` (= `key`), `time` (= `created_at`),
/// `datacontenttype` (= `content_type`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// UUIDv7 chosen by the producer; the idempotency key end to end.
    pub id: Uuid,
    /// Event, command or reply.
    pub kind: MessageKind,
    /// Logical channel, e.g. `orders`. Maps to a NATS subject suffix.
    pub topic: String,
    /// Ordering key, usually the aggregate id. Messages with the same key are
    /// delivered in commit order.
    pub key: String,
    /// Message type, e.g. `OrderPlaced`; consumers dispatch on it.
    #[serde(rename = "type")]
    pub message_type: String,
    /// Media type of `payload`.
    pub content_type: String,
    /// Payload bytes, opaque to custody.
    #[serde(with = "payload_bytes")]
    pub payload: Vec<u8>,
    /// Extension attributes: correlation id, causation id, traceparent, ...
    pub headers: BTreeMap<String, String>,
    /// When the producer created the message.
    pub created_at: DateTime<Utc>,
}

pub(crate) mod payload_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    // JSON payloads stay readable in JSON renderings; anything else is a byte array.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Vec::<u8>::deserialize(d)
    }
}

/// Longest topic, key and type accepted, in bytes.
pub const MAX_NAME_LEN: usize = 255;

impl Message {
    /// Start building a message for `topic`, ordered by `key`, of `message_type`.
    pub fn builder(
        topic: impl Into<String>,
        key: impl Into<String>,
        message_type: impl Into<String>,
    ) -> MessageBuilder {
        MessageBuilder {
            id: None,
            kind: MessageKind::Event,
            topic: topic.into(),
            key: key.into(),
            message_type: message_type.into(),
            content_type: CONTENT_TYPE_JSON.to_owned(),
            payload: Vec::new(),
            headers: BTreeMap::new(),
            created_at: None,
        }
    }

    /// Decode a JSON payload. The error names the message and its type.
    ///
    /// The payload is decoded only as what its content type says: a message
    /// whose content type is not JSON (`application/json`, or a
    /// `+json` media type such as `application/cloudevents+json`, with any
    /// parameters) is a permanent [`Error::Decode`] naming the content
    /// type, even when its bytes happen to parse as JSON.
    pub fn decode_json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        if !is_json_content_type(&self.content_type) {
            return Err(Error::Decode {
                message_id: self.id,
                message_type: self.message_type.clone(),
                reason: format!(
                    "content type is {:?}, not JSON; the producer must send {CONTENT_TYPE_JSON} (or a +json type) for a handler that decodes JSON",
                    self.content_type
                ),
            });
        }
        serde_json::from_slice(&self.payload).map_err(|e| Error::Decode {
            message_id: self.id,
            message_type: self.message_type.clone(),
            reason: e.to_string(),
        })
    }

    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Check the invariants every stored or transported message satisfies.
    ///
    /// Besides lengths and names: no text attribute may hold a NUL
    /// (PostgreSQL cannot store one in TEXT; a consumer would be handed a
    /// message it cannot record), and the topic, type and content type,
    /// which name things, hold no control character at all. Keys and header
    /// values may hold other control characters (tab, newline): every store
    /// keeps them and the NATS mapping percent-encodes them.
    pub fn validate(&self) -> Result<()> {
        validate_name("topic", &self.topic)?;
        no_control("topic", &self.topic)?;
        no_control("type", &self.message_type)?;
        no_control("content type", &self.content_type)?;
        no_nul("key", &self.key)?;
        for (name, value) in &self.headers {
            no_nul(&format!("header {name:?}"), value)?;
        }
        if self.topic.contains(['*', '>', ' ']) {
            return Err(Error::InvalidMessage(format!(
                "topic {:?} contains '*', '>' or a space; use letters, digits, '.', '-' and '_'",
                self.topic
            )));
        }
        validate_name("type", &self.message_type)?;
        if self.key.len() > MAX_NAME_LEN {
            return Err(Error::InvalidMessage(format!(
                "key is {} bytes; at most {MAX_NAME_LEN} are accepted",
                self.key.len()
            )));
        }
        for name in self.headers.keys() {
            validate_header_name(name)?;
        }
        // Transports carry the time as RFC 3339 (CloudEvents `time`), which
        // has four-digit years: a time outside 0000..=9999 would be published
        // and then dead-lettered by every consumer as malformed (found by the
        // envelope_json fuzz target).
        let year = chrono::Datelike::year(&self.created_at);
        if !(0..=9999).contains(&year) {
            return Err(Error::InvalidMessage(format!(
                "created_at {} is outside the years 0000 to 9999 that RFC 3339 (CloudEvents `time`) can carry; use the real creation time",
                self.created_at
            )));
        }
        Ok(())
    }
}

/// Whether `content_type` says JSON: `application/json` or any `+json`
/// media type, parameters (`; charset=utf-8`) and case ignored.
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == CONTENT_TYPE_JSON
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

fn no_nul(what: &str, value: &str) -> Result<()> {
    match value.find('\0') {
        None => Ok(()),
        Some(at) => Err(Error::InvalidMessage(format!(
            "{what} holds a NUL character at byte {at} ({}); databases cannot store it in text, remove it at the producer",
            escape_text(value)
        ))),
    }
}

fn no_control(what: &str, value: &str) -> Result<()> {
    match value.char_indices().find(|(_, c)| c.is_control()) {
        None => Ok(()),
        Some((at, c)) => Err(Error::InvalidMessage(format!(
            "{what} holds the control character {c:?} at byte {at} ({}); use printable characters only",
            escape_text(value)
        ))),
    }
}

/// `value` with every control character (NUL included) written as a
/// Rust-style escape (`\0`, `\n`, `\u{1b}`), for error texts and logs that
/// show a bad value. Text without control characters is returned as it is.
pub fn escape_text(value: &str) -> std::borrow::Cow<'_, str> {
    escape_chars(value, char::is_control)
}

/// `value` with every NUL written as `\0`: the one character a text column
/// of some database (PostgreSQL) cannot hold. Dead letters store what they
/// know of a bad message through it, so storing them never fails on the
/// bytes that made the message bad.
pub fn storable_text(value: &str) -> std::borrow::Cow<'_, str> {
    escape_chars(value, |c| c == '\0')
}

fn escape_chars(value: &str, bad: impl Fn(char) -> bool) -> std::borrow::Cow<'_, str> {
    if !value.chars().any(&bad) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        if bad(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

fn validate_name(what: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::InvalidMessage(format!(
            "{what} is empty; give every message a {what}"
        )));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(Error::InvalidMessage(format!(
            "{what} is {} bytes; at most {MAX_NAME_LEN} are accepted",
            value.len()
        )));
    }
    Ok(())
}

/// Header names are CloudEvents extension attribute names: 1 to 20 of `a-z0-9`.
pub fn validate_header_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidMessage(format!(
            "header name {name:?} is not a CloudEvents extension name; use 1 to 20 lowercase letters or digits (e.g. \"correlationid\")"
        )))
    }
}

/// Builder returned by [`Message::builder`].
#[derive(Debug)]
#[must_use]
pub struct MessageBuilder {
    id: Option<Uuid>,
    kind: MessageKind,
    topic: String,
    key: String,
    message_type: String,
    content_type: String,
    payload: Vec<u8>,
    headers: BTreeMap<String, String>,
    created_at: Option<DateTime<Utc>>,
}

impl MessageBuilder {
    /// Use this id instead of a fresh UUIDv7 (e.g. to derive it from a request id).
    pub fn id(mut self, id: Uuid) -> Self {
        self.id = Some(id);
        self
    }
    /// Event (default), command or reply.
    pub fn kind(mut self, kind: MessageKind) -> Self {
        self.kind = kind;
        self
    }
    /// Raw payload with its content type.
    pub fn payload(mut self, content_type: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        self.content_type = content_type.into();
        self.payload = payload.into();
        self
    }
    /// JSON payload.
    pub fn json<T: Serialize>(mut self, value: &T) -> Result<Self> {
        self.payload = serde_json::to_vec(value).map_err(|e| {
            Error::InvalidMessage(format!("payload does not serialize to JSON: {e}"))
        })?;
        self.content_type = CONTENT_TYPE_JSON.to_owned();
        Ok(self)
    }
    /// Add a header (CloudEvents extension attribute).
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Result<Self> {
        validate_header_name(name)?;
        self.headers.insert(name.to_owned(), value.into());
        Ok(self)
    }
    /// Creation time (default: now).
    pub fn created_at(mut self, at: DateTime<Utc>) -> Self {
        self.created_at = Some(at);
        self
    }
    /// Validate and build.
    pub fn build(self) -> Result<Message> {
        let msg = Message {
            id: self.id.unwrap_or_else(Uuid::now_v7),
            kind: self.kind,
            topic: self.topic,
            key: self.key,
            message_type: self.message_type,
            content_type: self.content_type,
            payload: self.payload,
            headers: self.headers,
            created_at: self.created_at.unwrap_or_else(Utc::now),
        };
        msg.validate()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_header_names_with_a_hint() {
        let err = Message::builder("t", "k", "T")
            .header("Correlation-Id", "x")
            .unwrap_err();
        assert!(
            err.to_string().contains("lowercase letters or digits"),
            "{err}"
        );
    }

    #[test]
    fn rejects_empty_topic() {
        let err = Message::builder("", "k", "T").build().unwrap_err();
        assert!(err.to_string().contains("topic is empty"), "{err}");
    }

    #[test]
    fn nul_and_control_characters_are_rejected_where_they_cannot_be_stored() {
        let base = || Message::builder("orders", "k", "T").build().unwrap();
        let mut m = base();
        m.key = "a\0b".into();
        let err = m.validate().unwrap_err().to_string();
        assert!(err.contains("key holds a NUL character at byte 1"), "{err}");
        assert!(err.contains("a\\0b"), "escaped in the error: {err}");
        let mut m = base();
        m.headers.insert("custodyproducer".into(), "p\0x".into());
        let err = m.validate().unwrap_err().to_string();
        assert!(
            err.contains("header \"custodyproducer\" holds a NUL"),
            "{err}"
        );
        for (topic, ty, ct) in [
            ("or\0ders", "T", ""),
            ("orders", "T\u{1b}", ""),
            ("orders", "T", "text/plain\n"),
        ] {
            let mut m = base();
            m.topic = topic.into();
            m.message_type = ty.into();
            m.content_type = ct.into();
            let err = m.validate().unwrap_err().to_string();
            assert!(err.contains("control character"), "{err}");
        }
        // a key or header value with a tab or newline is storable and travels
        let mut m = base();
        m.key = "a\tb\n".into();
        m.headers.insert("note".into(), "x\ry".into());
        assert!(m.validate().is_ok());
        assert!(!err_of_builder("k\0").is_empty());
    }

    fn err_of_builder(key: &str) -> String {
        Message::builder("t", key, "T")
            .build()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn escaping_for_storage_and_for_display() {
        assert_eq!(storable_text("p\0x\n"), "p\\0x\n");
        assert_eq!(escape_text("p\0x\n\u{1b}"), "p\\0x\\n\\u{1b}");
        assert!(matches!(
            storable_text("plain"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn decode_json_decodes_only_json_content_types() {
        let body = br#"{"a":1}"#.to_vec();
        for ct in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/cloudevents+json",
        ] {
            let m = Message::builder("t", "k", "T")
                .payload(ct, body.clone())
                .build()
                .unwrap();
            assert!(m.decode_json::<serde_json::Value>().is_ok(), "{ct}");
        }
        for ct in ["text/plain", "", "application/xml", "text/json+plain"] {
            let m = Message::builder("t", "k", "T")
                .payload(ct, body.clone())
                .build()
                .unwrap();
            let err = m.decode_json::<serde_json::Value>().unwrap_err();
            assert!(!err.retryable() && err.is_about_message());
            assert!(
                err.to_string().contains(&format!("content type is {ct:?}")),
                "{err}"
            );
        }
    }

    #[test]
    fn decode_error_names_the_message() {
        let m = Message::builder("t", "k", "OrderPlaced")
            .payload(CONTENT_TYPE_JSON, b"{not json".to_vec())
            .build()
            .unwrap();
        let err = m.decode_json::<serde_json::Value>().unwrap_err();
        assert!(err.to_string().contains("OrderPlaced"), "{err}");
        assert!(!err.retryable());
    }
}
