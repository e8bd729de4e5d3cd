//! Reading stream messages by sequence with the JSON API
//! (`$JS.API.STREAM.MSG.GET`), whose headers arrive base64-encoded inside
//! the JSON body and are parsed here, not by the client.
//!
//! The async-nats client parses the headers of every message it receives in
//! its connection task, and a header block it cannot parse (invalid UTF-8,
//! a line without a colon, a bad header name) makes it drop the whole
//! connection (`header isn't valid utf-8`; async-nats 0.42 to 0.51 at
//! least). A pull consumer then never gets past such a message. The
//! subscriber reads the messages it must deliver again through this module
//! instead, so such a message becomes a [`Malformed`] delivery with its raw
//! bytes, dead-lettered like any other malformed message.

use std::str::FromStr;
use std::time::Duration;

use async_nats::{HeaderMap, HeaderName};
use base64::Engine;
use bytes::Bytes;
use custody_core::Malformed;
use serde::Deserialize;

use crate::codec::decode;
use crate::NatsError;

/// One stored message, as the server keeps it.
#[derive(Debug, Clone)]
pub(crate) struct StoredMessage {
    pub(crate) subject: String,
    pub(crate) sequence: u64,
    /// The raw header block (`NATS/1.0\r\n...`), if any.
    pub(crate) headers: Option<Vec<u8>>,
    pub(crate) payload: Vec<u8>,
}

#[derive(Deserialize)]
struct GetResponse {
    message: Option<RawMessage>,
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct RawMessage {
    subject: String,
    seq: u64,
    #[serde(default)]
    hdrs: Option<String>,
    #[serde(default)]
    data: Option<String>,
}

#[derive(Deserialize)]
struct ApiError {
    code: u16,
    #[serde(default)]
    description: String,
}

/// The first message of `stream` at or after `sequence` whose subject
/// matches `subject` (wildcards allowed), or `None` when there is none.
pub(crate) async fn next_message(
    client: &async_nats::Client,
    stream: &str,
    sequence: u64,
    subject: &str,
    timeout: Duration,
) -> Result<Option<StoredMessage>, NatsError> {
    let body = serde_json::json!({ "seq": sequence, "next_by_subj": subject }).to_string();
    let what = || format!("read stream {stream} from sequence {sequence} ({subject})");
    let request = client.request(
        format!("$JS.API.STREAM.MSG.GET.{stream}"),
        Bytes::from(body),
    );
    let reply = match tokio::time::timeout(timeout, request).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(source)) => {
            return Err(NatsError::DirectGet {
                what: what(),
                reason: source.to_string(),
            })
        }
        Err(_) => {
            return Err(NatsError::Timeout {
                what: what(),
                after: timeout,
            })
        }
    };
    let response: GetResponse =
        serde_json::from_slice(&reply.payload).map_err(|e| NatsError::DirectGet {
            what: what(),
            reason: format!("unreadable answer: {e}"),
        })?;
    if let Some(error) = response.error {
        if error.code == 404 {
            return Ok(None);
        }
        return Err(NatsError::DirectGet {
            what: what(),
            reason: format!("error {}: {}", error.code, error.description),
        });
    }
    let Some(raw) = response.message else {
        return Ok(None);
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let unbase = |field: &str, s: &str| {
        b64.decode(s).map_err(|e| NatsError::DirectGet {
            what: what(),
            reason: format!("{field} of sequence {} is not base64: {e}", raw.seq),
        })
    };
    let headers = match raw.hdrs.as_deref() {
        Some(h) if !h.is_empty() => Some(unbase("headers", h)?),
        _ => None,
    };
    let payload = match raw.data.as_deref() {
        Some(d) if !d.is_empty() => unbase("payload", d)?,
        _ => Vec::new(),
    };
    Ok(Some(StoredMessage {
        subject: raw.subject.clone(),
        sequence: raw.seq,
        headers,
        payload,
    }))
}

/// Parse a raw header block the way the client would, or say why the
/// client would fail on it.
pub(crate) fn parse_headers(raw: &[u8]) -> Result<HeaderMap, String> {
    let text = std::str::from_utf8(raw).map_err(|e| {
        format!(
            "header isn't valid UTF-8 (byte {} of the header block)",
            e.valid_up_to()
        )
    })?;
    let mut lines = text.lines().peekable();
    let version = lines.next().unwrap_or_default();
    if !version.starts_with("NATS/1.0") {
        return Err("header version line does not begin with `NATS/1.0`".to_owned());
    }
    let mut headers = HeaderMap::new();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("header line without a colon: {line:?}"));
        };
        let name =
            HeaderName::from_str(name).map_err(|e| format!("invalid header name {name:?}: {e}"))?;
        let mut value = value.trim_start().to_owned();
        while let Some(more) = lines.next_if(|s| s.starts_with(char::is_whitespace)) {
            value.push_str(more);
        }
        headers.append(name, value.trim_end());
    }
    Ok(headers)
}

/// Decode a stored message into a custody message, or a [`Malformed`] one
/// that keeps its raw bytes (headers escaped in the reason, payload as is)
/// when its headers are not what the client can parse.
pub(crate) fn decode_stored(
    stream: &str,
    stored: &StoredMessage,
    subject_prefix: &str,
) -> Result<custody_core::Message, Malformed> {
    let headers = match stored.headers.as_deref().map(parse_headers) {
        None => None,
        Some(Ok(h)) => Some(h),
        Some(Err(why)) => {
            let raw = stored.headers.as_deref().unwrap_or_default();
            let mut bad = match decode(&stored.subject, None, &stored.payload, subject_prefix) {
                Err(bad) => bad,
                Ok(_) => Malformed {
                    id: None,
                    topic: stored.subject.clone(),
                    payload: stored.payload.clone(),
                    reason: String::new(),
                },
            };
            bad.id = lenient_id(raw);
            bad.reason = format!(
                "{why}; the NATS client cannot parse this message's headers (it would drop its connection on it), so it was read by stream sequence {} of stream {stream}; raw header bytes: \"{}\"",
                stored.sequence,
                raw.escape_ascii()
            );
            return Err(bad);
        }
    };
    decode(
        &stored.subject,
        headers.as_ref(),
        &stored.payload,
        subject_prefix,
    )
}

/// The `ce-id` of an unparseable header block, if it is a readable UUID.
fn lenient_id(raw: &[u8]) -> Option<uuid::Uuid> {
    String::from_utf8_lossy(raw).lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if name.trim().eq_ignore_ascii_case(crate::CE_ID) {
            uuid::Uuid::parse_str(value.trim()).ok()
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::parse_headers;

    #[test]
    fn parses_what_the_client_parses_and_names_what_it_cannot() {
        let ok = parse_headers(b"NATS/1.0\r\nce-id: 1\r\nx: a b\r\n\r\n").expect("valid");
        assert_eq!(ok.get("x").map(|v| v.as_str()), Some("a b"));
        let bad = parse_headers(b"NATS/1.0\r\nce-id: \xff\r\n\r\n").expect_err("invalid");
        assert!(bad.contains("UTF-8"), "{bad}");
        let bad = parse_headers(b"NATS/1.0\r\nno colon\r\n\r\n").expect_err("invalid");
        assert!(bad.contains("colon"), "{bad}");
        assert!(parse_headers(b"HTTP/1.1\r\n\r\n").is_err());
    }
}
