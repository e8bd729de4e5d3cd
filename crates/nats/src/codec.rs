//! The mapping between custody's [`Message`] and a NATS message in
//! CloudEvents 1.0 binary mode.
//!
//! Header values are percent-encoded as the CloudEvents HTTP binding
//! prescribes for `ce-*` headers (space, `"`, `%` and every byte outside
//! printable ASCII), because NATS headers cannot carry CR/LF and the server
//! trims leading and trailing whitespace: without the encoding a key or
//! header value such as `" a\nb "` would not survive the trip.

use std::collections::BTreeMap;

use async_nats::header::{HeaderMap, NATS_MESSAGE_ID};
use chrono::{DateTime, SecondsFormat, Utc};
use custody_core::{Malformed, Message, MessageKind};
use uuid::Uuid;

/// `ce-specversion`: always `1.0`.
pub const CE_SPECVERSION: &str = "ce-specversion";
/// `ce-id`: the message id (UUIDv7).
pub const CE_ID: &str = "ce-id";
/// `ce-type`: the message type.
pub const CE_TYPE: &str = "ce-type";
/// `ce-source`: always [`SOURCE`].
pub const CE_SOURCE: &str = "ce-source";
/// `ce-subject`: the ordering key (CloudEvents `subject`).
pub const CE_SUBJECT: &str = "ce-subject";
/// `ce-partitionkey`: the ordering key (CloudEvents partitioning extension).
pub const CE_PARTITIONKEY: &str = "ce-partitionkey";
/// `ce-time`: creation time, RFC 3339.
pub const CE_TIME: &str = "ce-time";
/// `content-type`: media type of the payload (CloudEvents `datacontenttype`).
pub const CONTENT_TYPE: &str = "content-type";
/// `ce-custodykind`: `event`, `command` or `reply`.
pub const CE_CUSTODYKIND: &str = "ce-custodykind";
/// `ce-custodytopic`: the custody topic.
pub const CE_CUSTODYTOPIC: &str = "ce-custodytopic";
/// The CloudEvents spec version written and accepted.
pub const SPECVERSION: &str = "1.0";
/// The `ce-source` custody writes.
pub const SOURCE: &str = "custody";

const CE_PREFIX: &str = "ce-";
/// Envelope headers whose name is taken by a CloudEvents context attribute
/// (or one of custody's own) travel as `custody-ext-<name>` so that they
/// neither clobber nor get clobbered by the attribute.
const ESCAPED_PREFIX: &str = "custody-ext-";

/// CloudEvents context attribute names (and custody's extensions) that an
/// envelope header must not shadow.
const RESERVED: &[&str] = &[
    "specversion",
    "id",
    "type",
    "source",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "partitionkey",
    "custodykind",
    "custodytopic",
];

/// NATS headers for `msg` in CloudEvents 1.0 binary mode, plus
/// `Nats-Msg-Id: <id>` for JetStream's duplicate detection.
///
/// Every envelope header `name` becomes `ce-<name>`, except names taken by a
/// CloudEvents attribute (`id`, `type`, `time`, ...), which become
/// `custody-ext-<name>`. [`decode`] reverses this exactly.
pub fn encode_headers(msg: &Message) -> HeaderMap {
    encode_headers_with_msg_id(msg, None)
}

/// [`encode_headers`], with `Nats-Msg-Id` set to `nats_msg_id` instead of
/// the message id when given (a republish), so the id is not formatted and
/// inserted twice.
pub(crate) fn encode_headers_with_msg_id(msg: &Message, nats_msg_id: Option<String>) -> HeaderMap {
    let mut h = HeaderMap::new();
    let id = msg.id.to_string();
    match nats_msg_id {
        Some(nats_msg_id) => h.insert(NATS_MESSAGE_ID, nats_msg_id),
        None => h.insert(NATS_MESSAGE_ID, id.as_str()),
    }
    h.insert(CE_SPECVERSION, SPECVERSION);
    h.insert(CE_ID, id);
    h.insert(CE_TYPE, encode_value(&msg.message_type));
    h.insert(CE_SOURCE, SOURCE);
    // CloudEvents requires `subject`, when present, to be non-empty.
    if !msg.key.is_empty() {
        let key = encode_value(&msg.key);
        h.insert(CE_SUBJECT, key.as_str());
        h.insert(CE_PARTITIONKEY, key);
    }
    h.insert(
        CE_TIME,
        msg.created_at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
    );
    if !msg.content_type.is_empty() {
        h.insert(CONTENT_TYPE, encode_content_type(&msg.content_type));
    }
    h.insert(CE_CUSTODYKIND, msg.kind.as_str());
    h.insert(CE_CUSTODYTOPIC, encode_value(&msg.topic));
    for (name, value) in &msg.headers {
        let header = if RESERVED.contains(&name.as_str()) {
            format!("{ESCAPED_PREFIX}{name}")
        } else {
            format!("{CE_PREFIX}{name}")
        };
        h.insert(header, encode_value(value));
    }
    h
}

/// Turn a received NATS message back into a [`Message`].
///
/// `ce-id`, `ce-type` and `ce-time` are required; the topic comes from
/// `ce-custodytopic` or else from `subject` without `<subject_prefix>.`; the
/// key from `ce-partitionkey` or else `ce-subject` (empty when neither is
/// present); the kind from `ce-custodykind` (default `event`). Anything
/// missing or unreadable gives a [`Malformed`] whose `reason` names the header.
pub fn decode(
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
    subject_prefix: &str,
) -> Result<Message, Malformed> {
    let topic_from_subject = subject
        .strip_prefix(subject_prefix)
        .and_then(|rest| rest.strip_prefix('.'))
        .filter(|t| !t.is_empty())
        .unwrap_or(subject);
    let mut bad = Malformed {
        id: None,
        topic: topic_from_subject.to_owned(),
        payload: payload.to_vec(),
        reason: String::new(),
    };
    macro_rules! malformed {
        ($($arg:tt)*) => {{
            bad.reason = format!($($arg)*);
            return Err(bad);
        }};
    }

    let Some(headers) = headers else {
        malformed!("missing header {CE_ID} (the message has no headers at all; custody expects CloudEvents binary mode)");
    };
    // Header names are case-insensitive in CloudEvents bindings; keep the first value.
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, values) in headers.iter() {
        let mut name = name.to_string();
        name.make_ascii_lowercase();
        let Some(value) = values.first() else {
            continue;
        };
        if name.starts_with(CE_PREFIX) || name.starts_with(ESCAPED_PREFIX) || name == CONTENT_TYPE {
            match decode_value(value.as_str()) {
                Ok(v) => {
                    map.entry(name).or_insert(v);
                }
                Err(e) => malformed!("header {name}: {e}"),
            }
        }
    }

    if let Some(topic) = map.get(CE_CUSTODYTOPIC) {
        bad.topic = topic.clone();
    }
    let id = match map.get(CE_ID) {
        None => malformed!("missing header {CE_ID}"),
        Some(v) => match Uuid::parse_str(v) {
            Ok(id) => id,
            Err(e) => malformed!("header {CE_ID} is not a UUID ({v:?}): {e}"),
        },
    };
    bad.id = Some(id);
    match map.get(CE_SPECVERSION).map(String::as_str) {
        None | Some(SPECVERSION) => {}
        Some(other) => {
            malformed!("header {CE_SPECVERSION} is {other:?}; only CloudEvents {SPECVERSION} is understood")
        }
    }
    let Some(message_type) = map.get(CE_TYPE).cloned() else {
        malformed!("missing header {CE_TYPE}");
    };
    let created_at = match map.get(CE_TIME) {
        None => malformed!("missing header {CE_TIME}"),
        Some(v) => match DateTime::parse_from_rfc3339(v) {
            Ok(t) => t.with_timezone(&Utc),
            Err(e) => malformed!("header {CE_TIME} is not an RFC 3339 time ({v:?}): {e}"),
        },
    };
    let kind = match map.get(CE_CUSTODYKIND) {
        None => MessageKind::Event,
        Some(v) => match v.parse::<MessageKind>() {
            Ok(k) => k,
            Err(e) => malformed!("header {CE_CUSTODYKIND}: {e}"),
        },
    };
    let key = map
        .get(CE_PARTITIONKEY)
        .or_else(|| map.get(CE_SUBJECT))
        .cloned()
        .unwrap_or_default();
    let content_type = map.get(CONTENT_TYPE).cloned().unwrap_or_default();

    let mut msg_headers = BTreeMap::new();
    for (name, value) in &map {
        if let Some(ext) = name.strip_prefix(ESCAPED_PREFIX) {
            msg_headers.insert(ext.to_owned(), value.clone());
        } else if let Some(ext) = name.strip_prefix(CE_PREFIX) {
            if !RESERVED.contains(&ext) {
                msg_headers.insert(ext.to_owned(), value.clone());
            }
        }
    }

    let msg = Message {
        id,
        kind,
        topic: bad.topic.clone(),
        key,
        message_type,
        content_type,
        payload: payload.to_vec(),
        headers: msg_headers,
        created_at,
    };
    if let Err(e) = msg.validate() {
        malformed!("{e}");
    }
    Ok(msg)
}

/// Percent-encode as the CloudEvents HTTP binding does for `ce-*` values.
fn encode_value(v: &str) -> String {
    percent_encode(v, |b| {
        b == b' ' || b == b'"' || b == b'%' || !(0x21..=0x7e).contains(&b)
    })
}

/// `content-type` stays a plain media type for non-custody readers; only
/// what cannot travel (controls, non-ASCII, `%`, edge spaces) is encoded.
fn encode_content_type(v: &str) -> String {
    let inner = v.trim_matches(' ');
    let lead = v.len() - v.trim_start_matches(' ').len();
    let trail = if inner.is_empty() {
        0
    } else {
        v.len() - v.trim_end_matches(' ').len()
    };
    let mut out = "%20".repeat(lead);
    out.push_str(&percent_encode(inner, |b| {
        b == b'%' || !(0x20..=0x7e).contains(&b)
    }));
    out.push_str(&"%20".repeat(trail));
    out
}

fn percent_encode(v: &str, escape: impl Fn(u8) -> bool) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(v.len());
    for &b in v.as_bytes() {
        if escape(b) {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        } else {
            out.push(b as char);
        }
    }
    out
}

/// Reverse of the encodings above. A `%` not followed by two hex digits is
/// kept as it is (custody never writes one; other producers might).
fn decode_value(v: &str) -> Result<String, String> {
    if !v.contains('%') {
        return Ok(v.to_owned());
    }
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "percent-decoded value is not UTF-8".to_owned())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Size of the header block as sent on the wire (`NATS/1.0\r\n`,
/// `name: value\r\n` each, a blank line), counted against `max_payload`.
pub(crate) fn headers_wire_len(h: &HeaderMap) -> usize {
    let mut n = "NATS/1.0\r\n".len() + 2;
    for (name, values) in h.iter() {
        let name_len = AsRef::<[u8]>::as_ref(name).len();
        for v in values {
            n += name_len + 2 + v.as_str().len() + 2;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_is_uppercase_two_digit_hex() {
        assert_eq!(
            encode_value(" a\"%\r\n\u{7f}é"),
            "%20a%22%25%0D%0A%7F%C3%A9"
        );
        assert_eq!(
            encode_content_type("  text/plain; a=\"b c\"\t% "),
            "%20%20text/plain; a=\"b c\"%09%25%20"
        );
        for b in 0u8..0x80 {
            let s = char::from(b).to_string();
            assert_eq!(decode_value(&encode_value(&s)), Ok(s));
        }
    }
}
