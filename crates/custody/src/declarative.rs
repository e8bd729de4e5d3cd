//! A handler described by a string instead of code (cargo feature
//! `declarative`), for operating and testing (`custody consume --handler
//! …`): `print`, `record:<table>` or `http(s)://…` (written `http:<url>`). It runs inside custody's real
//! [`Consumer`](crate::Consumer), so the inbox, dead letters, poison
//! detection and graceful shutdown are the ones a service gets.
//!
//! - [`HandlerSpec::Print`]: one JSON line per message (id, topic, key,
//!   type, kind, content type, headers, time, payload as UTF-8 text when it
//!   is, else base64 with `"payload_encoding": "base64"`).
//! - [`HandlerSpec::Record`]: insert the message into a table of the
//!   consumer's database, in the inbox transaction: exactly once in effect.
//! - [`HandlerSpec::Http`]: POST the payload in CloudEvents binary mode with
//!   `Idempotency-Key: <message id>`; 2xx is done, 408/429/5xx and
//!   connection trouble are retried, any other status dead-letters the
//!   message with the status and the start of the response body. The
//!   endpoint sees at-least-once delivery and must dedupe by the key.
//!
//! ```
//! use custody::declarative::HandlerSpec;
//!
//! let spec: HandlerSpec = "record:received".parse()?;
//! assert_eq!(spec.to_string(), "record:received");
//! assert!("record:custody_inbox".parse::<HandlerSpec>().is_err()); // custody's own
//! assert!("http:ftp://example.com".parse::<HandlerSpec>().is_err());
//! # Ok::<(), custody::Error>(())
//! ```

use std::fmt;
use std::future::Future;
use std::io::Write;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use custody_core::{escape_text, Error, Handler, HandlerError, Message, Result};

/// What `custody consume --handler` does with each message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerSpec {
    /// `print`: one JSON line per message on the handler's output.
    Print,
    /// `record:<table>`: insert the message into `<table>` of the consumer
    /// database (created if missing) in the inbox transaction.
    Record(TableName),
    /// `http:<url>`: POST the payload to an `http://` or `https://` URL.
    Http(String),
}

impl HandlerSpec {
    /// Whether the handler's effect commits with the inbox row (a table
    /// write) rather than happening outside the transaction (a line
    /// printed, a request sent). Effects outside are repeated when a group
    /// of messages is retried one at a time, so the consumer applies them
    /// one message per transaction.
    pub fn effect_in_transaction(&self) -> bool {
        matches!(self, HandlerSpec::Record(_))
    }
}

const FORMS: &str = "print, record:<table> or http:<http(s) url>";

impl FromStr for HandlerSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s == "print" {
            return Ok(HandlerSpec::Print);
        }
        if let Some(table) = s.strip_prefix("record:") {
            return Ok(HandlerSpec::Record(table.parse()?));
        }
        if let Some(url) = s.strip_prefix("http:") {
            // `http:https://host/x`, `http:http://host/x`, or the plain URL
            // itself (`http://host/x` starts with `http:` too)
            let url = if url.starts_with("//") { s } else { url };
            let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
            let host = url.split_once("://").map(|(_, rest)| rest).unwrap_or("");
            if !scheme_ok || host.is_empty() || host.starts_with('/') {
                return Err(Error::Config(format!(
                    "handler {s:?}: {url:?} is not an http:// or https:// URL with a host; write http:https://host/path (or http:http://…)"
                )));
            }
            return Ok(HandlerSpec::Http(url.to_owned()));
        }
        if s.starts_with("https:") {
            return Self::from_str(&format!("http:{s}"));
        }
        Err(Error::Config(format!(
            "handler {s:?} is not one this custody knows; use {FORMS}"
        )))
    }
}

impl fmt::Display for HandlerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerSpec::Print => f.write_str("print"),
            HandlerSpec::Record(t) => write!(f, "record:{t}"),
            HandlerSpec::Http(url) => write!(f, "http:{}", custody_core::redact_url(url)),
        }
    }
}

/// A table name `record:` may write to: 1 to 63 of `a-z`, `0-9`, `_`,
/// starting with a letter or `_`, and not one of custody's own tables
/// (`custody_…`) or a database's internal ones (`sqlite_…`, `pg_…`,
/// `_sqlx…`). Lower case only, so the name means the same table on every
/// backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName(String);

impl TableName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TableName {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let shown = escape_text(s);
        let well_formed = !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !s.as_bytes()[0].is_ascii_digit();
        if !well_formed {
            return Err(Error::Config(format!(
                "table name {shown:?} is not accepted; use 1 to 63 lower-case letters, digits and '_', starting with a letter or '_' (e.g. record:received)"
            )));
        }
        for reserved in ["custody_", "sqlite_", "pg_", "_sqlx"] {
            if s.starts_with(reserved) {
                return Err(Error::Config(format!(
                    "table name {shown:?} starts with {reserved:?}, which is reserved for custody's or the database's own tables; choose another name"
                )));
            }
        }
        Ok(TableName(s.to_owned()))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `record:` action of one backend: creates the table and inserts a
/// message into it inside the consumer's transaction `Tx`. Each backend of
/// the facade has one ([`crate::run_consumer`]).
pub trait RecordSink<Tx>: Send + Sync + 'static {
    /// Create the table if missing and check that an existing one has the
    /// columns the inserts need.
    fn prepare(&self) -> impl Future<Output = Result<()>> + Send;

    /// Insert `message` into the table on `tx`.
    fn insert(
        &self,
        tx: &mut Tx,
        message: &Message,
    ) -> impl Future<Output = std::result::Result<(), HandlerError>> + Send;
}

/// How long one `http:` request may take (connect, send, response head)
/// before the attempt counts as a transient failure.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of an error response's body kept in the dead letter.
const BODY_PREVIEW: usize = 200;

/// The handler a [`HandlerSpec`] describes, with `R` the backend's
/// [`RecordSink`] (used by `record:` only).
pub struct DeclarativeHandler<R> {
    action: Action<R>,
    stop: Option<custody_engine::CancellationToken>,
}

enum Action<R> {
    Print(Mutex<Box<dyn Write + Send>>),
    Record(R),
    Http {
        client: reqwest::Client,
        url: String,
    },
}

impl<R> DeclarativeHandler<R> {
    /// The handler of `spec`: `print` writes to standard output, `record:`
    /// goes through `sink` (made by the caller for its backend and table;
    /// call [`RecordSink::prepare`] before consuming).
    pub fn new(spec: &HandlerSpec, sink: impl FnOnce(&TableName) -> R) -> Result<Self> {
        let action = match spec {
            HandlerSpec::Print => Action::Print(Mutex::new(Box::new(std::io::stdout()))),
            HandlerSpec::Record(table) => Action::Record(sink(table)),
            HandlerSpec::Http(url) => Action::Http {
                client: reqwest::Client::builder()
                    .timeout(HTTP_TIMEOUT)
                    // a POST redirected would turn into a GET: refuse instead
                    .redirect(reqwest::redirect::Policy::none())
                    .user_agent(concat!("custody/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| {
                        Error::Config(format!(
                            "cannot build the HTTP client for {}: {e}",
                            custody_core::redact_url(url)
                        ))
                    })?,
                url: url.clone(),
            },
        };
        Ok(DeclarativeHandler { action, stop: None })
    }

    /// Write `print` lines to `out` instead of standard output.
    #[must_use]
    pub fn print_to(mut self, out: impl Write + Send + 'static) -> Self {
        if let Action::Print(w) = &mut self.action {
            *w = Mutex::new(Box::new(out));
        }
        self
    }

    /// Cancel `stop` when the handler can never work again (`print` to a
    /// closed pipe, as in `custody consume … | head`): the consumer stops
    /// with the message unacknowledged instead of dead-lettering it and
    /// every message after it.
    #[must_use]
    pub fn with_stop(mut self, stop: custody_engine::CancellationToken) -> Self {
        self.stop = Some(stop);
        self
    }

    /// The record sink, when the handler is `record:`.
    pub fn sink(&self) -> Option<&R> {
        match &self.action {
            Action::Record(r) => Some(r),
            _ => None,
        }
    }
}

impl<Tx, R> Handler<Tx> for DeclarativeHandler<R>
where
    Tx: Send + 'static,
    R: RecordSink<Tx>,
{
    async fn handle(
        &self,
        tx: &mut Tx,
        message: &Message,
    ) -> std::result::Result<(), HandlerError> {
        match &self.action {
            Action::Print(out) => print(out, message, self.stop.as_ref()),
            Action::Record(sink) => sink.insert(tx, message).await,
            Action::Http { client, url } => post(client, url, message).await,
        }
    }
}

/// Payload bytes as `print` shows them: the text when they are UTF-8
/// (`"utf8"`), else base64 (`"base64"`); the second value is the
/// `payload_encoding` a line carries.
pub fn payload_text(payload: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(payload) {
        Ok(text) => (text.to_owned(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(payload),
            "base64",
        ),
    }
}

/// Payload bytes as a JSON value: the parsed document when `content_type`
/// is JSON and the bytes parse (`"json"`), else as [`payload_text`] shows
/// them (`custody events` prints events this way).
pub fn payload_value(content_type: &str, payload: &[u8]) -> (serde_json::Value, &'static str) {
    if custody_core::is_json_content_type(content_type) {
        if let Ok(value) = serde_json::from_slice(payload) {
            return (value, "json");
        }
    }
    let (text, encoding) = payload_text(payload);
    (serde_json::Value::String(text), encoding)
}

/// One message as the JSON line `print` writes.
pub fn print_line(message: &Message) -> serde_json::Value {
    let (payload, encoding) = payload_text(&message.payload);
    serde_json::json!({
        "id": message.id,
        "topic": message.topic,
        "key": message.key,
        "type": message.message_type,
        "kind": message.kind.as_str(),
        "content_type": message.content_type,
        "headers": message.headers,
        "created_at": message.created_at,
        "payload": payload,
        "payload_encoding": encoding,
    })
}

fn print(
    out: &Mutex<Box<dyn Write + Send>>,
    message: &Message,
    stop: Option<&custody_engine::CancellationToken>,
) -> std::result::Result<(), HandlerError> {
    let line = print_line(message).to_string();
    let mut out = out
        .lock()
        .map_err(|_| HandlerError::transient("the print output's lock was poisoned"))?;
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| {
            // a closed pipe (`custody consume … | head`) will not reopen:
            // stop rather than dead-letter what nobody could read
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                if let Some(stop) = stop {
                    tracing::warn!("the output of print was closed; stopping");
                    stop.cancel();
                }
            }
            HandlerError::transient(format!("cannot write to the output: {e}"))
        })
}

/// `value` percent-encoded as the CloudEvents HTTP binding prescribes for
/// `ce-*` header values: space, `"`, `%` and every byte outside printable
/// ASCII.
fn ce_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_graphic() && b != b'"' && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// CloudEvents context attributes an envelope header must not shadow;
/// such headers travel as `custody-ext-<name>` (as on NATS).
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

/// The request headers of `message` in CloudEvents 1.0 binary mode, plus
/// `Idempotency-Key`.
pub fn http_headers(message: &Message) -> Vec<(String, String)> {
    let id = message.id.to_string();
    let mut h = vec![
        ("ce-specversion".to_owned(), "1.0".to_owned()),
        ("ce-id".to_owned(), id.clone()),
        ("ce-type".to_owned(), ce_value(&message.message_type)),
        ("ce-source".to_owned(), "custody".to_owned()),
        (
            "ce-time".to_owned(),
            message
                .created_at
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        ),
        (
            "ce-custodykind".to_owned(),
            message.kind.as_str().to_owned(),
        ),
        ("ce-custodytopic".to_owned(), ce_value(&message.topic)),
        ("idempotency-key".to_owned(), id),
    ];
    if !message.key.is_empty() {
        h.push(("ce-subject".to_owned(), ce_value(&message.key)));
        h.push(("ce-partitionkey".to_owned(), ce_value(&message.key)));
    }
    if !message.content_type.is_empty() {
        h.push(("content-type".to_owned(), ce_value(&message.content_type)));
    }
    for (name, value) in &message.headers {
        let header = if RESERVED.contains(&name.as_str()) {
            format!("custody-ext-{name}")
        } else {
            format!("ce-{name}")
        };
        h.push((header, ce_value(value)));
    }
    h
}

/// Whether an HTTP status means "try again later".
pub fn status_is_transient(status: u16) -> bool {
    status == 408 || status == 429 || (500..=599).contains(&status)
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    message: &Message,
) -> std::result::Result<(), HandlerError> {
    // what errors (and so dead letters) show: never the URL's password
    let shown = custody_core::redact_url(url);
    let mut request = client.post(url).body(message.payload.clone());
    for (name, value) in http_headers(message) {
        request = request.header(name, value);
    }
    let mut response = match request.send().await {
        Ok(r) => r,
        // connection refused, reset, timeout, TLS trouble: maybe later
        Err(e) => {
            return Err(HandlerError::transient(format!(
                "POST {shown} failed: {}",
                error_chain(&e)
            )))
        }
    };
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let mut body = Vec::new();
    while body.len() < BODY_PREVIEW {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    body.truncate(BODY_PREVIEW);
    let body = String::from_utf8_lossy(&body);
    let text = format!(
        "POST {shown} answered HTTP {status}; response body: {}",
        escape_text(body.trim())
    );
    if status_is_transient(status.as_u16()) {
        Err(HandlerError::transient(text))
    } else if status.is_redirection() {
        Err(HandlerError::permanent(format!(
            "{text}; redirects are not followed (a POST would turn into a GET): give the final URL"
        )))
    } else {
        Err(HandlerError::permanent(format!(
            "{text}; the endpoint refused the message, retrying will not help"
        )))
    }
}

/// An error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// Insert statement and table definition of `record:` on one backend.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
macro_rules! sql_sink {
    ($(#[$doc:meta])* $name:ident, $backend:literal, $db:ty, $pool:ty, $create:literal, $insert:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name {
            pool: $pool,
            table: TableName,
            insert: String,
        }

        impl $name {
            /// The sink writing into `table` of the database of `pool`.
            pub fn new(pool: $pool, table: &TableName) -> Self {
                $name {
                    insert: format!($insert, table = table),
                    pool,
                    table: table.clone(),
                }
            }
        }

        impl RecordSink<sqlx::Transaction<'static, $db>> for $name {
            async fn prepare(&self) -> Result<()> {
                let create = format!($create, table = self.table);
                sqlx::query(&create).execute(&self.pool).await.map_err(|e| {
                    Error::store(
                        $backend,
                        "create record table",
                        false,
                        format!("cannot create table {}: {e}", self.table),
                    )
                })?;
                let check = format!(
                    "SELECT message_id, topic, msg_key, msg_type, kind, content_type, headers, payload, created_at, recorded_at FROM \"{}\" WHERE 1 = 0",
                    self.table
                );
                sqlx::query(&check).execute(&self.pool).await.map_err(|e| {
                    Error::Config(format!(
                        "table {} exists without the columns record: writes (message_id, topic, msg_key, msg_type, kind, content_type, headers, payload, created_at, recorded_at): {e}; name a new table",
                        self.table
                    ))
                })?;
                Ok(())
            }

            async fn insert(
                &self,
                tx: &mut sqlx::Transaction<'static, $db>,
                m: &Message,
            ) -> std::result::Result<(), HandlerError> {
                let headers = serde_json::to_string(&m.headers).map_err(HandlerError::permanent)?;
                sqlx::query(&self.insert)
                    .bind(m.id.to_string())
                    .bind(&m.topic)
                    .bind(&m.key)
                    .bind(&m.message_type)
                    .bind(m.kind.as_str())
                    .bind(&m.content_type)
                    .bind(headers)
                    .bind(&m.payload)
                    .bind(m.created_at)
                    .execute(&mut **tx)
                    .await
                    .map(|_| ())
                    .map_err(|e| insert_error(&self.table, e))
            }
        }
    };
}

/// A refused row (constraint, data) will never insert: dead-letter it;
/// anything else (busy, lost connection) may work later.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn insert_error(table: &TableName, e: sqlx::Error) -> HandlerError {
    let text = format!("insert into {table} failed: {e}");
    match &e {
        sqlx::Error::Database(db) if db.kind() != sqlx::error::ErrorKind::Other => {
            HandlerError::permanent(text)
        }
        _ => HandlerError::transient(text),
    }
}

#[cfg(feature = "sqlite")]
sql_sink!(
    /// `record:` on SQLite.
    SqliteRecord,
    "sqlite",
    sqlx::Sqlite,
    sqlx::SqlitePool,
    // no UNIQUE on message_id on purpose: the inbox is what keeps it once,
    // and the table shows it (count(*) = count(DISTINCT message_id))
    "CREATE TABLE IF NOT EXISTS \"{table}\" (seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL, topic TEXT NOT NULL, msg_key TEXT NOT NULL, msg_type TEXT NOT NULL, kind TEXT NOT NULL, content_type TEXT NOT NULL, headers TEXT NOT NULL, payload BLOB NOT NULL, created_at TEXT NOT NULL, recorded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))",
    "INSERT INTO \"{table}\" (message_id, topic, msg_key, msg_type, kind, content_type, headers, payload, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
);

#[cfg(feature = "postgres")]
sql_sink!(
    /// `record:` on PostgreSQL.
    PgRecord,
    "postgres",
    sqlx::Postgres,
    sqlx::PgPool,
    "CREATE TABLE IF NOT EXISTS \"{table}\" (seq BIGSERIAL PRIMARY KEY, message_id TEXT NOT NULL, topic TEXT NOT NULL, msg_key TEXT NOT NULL, msg_type TEXT NOT NULL, kind TEXT NOT NULL, content_type TEXT NOT NULL, headers TEXT NOT NULL, payload BYTEA NOT NULL, created_at TIMESTAMPTZ NOT NULL, recorded_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    "INSERT INTO \"{table}\" (message_id, topic, msg_key, msg_type, kind, content_type, headers, payload, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
);

/// The sink of a handler that records nothing (`print`, `http:`), for any
/// transaction type.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRecord;

impl<Tx: Send + 'static> RecordSink<Tx> for NoRecord {
    async fn prepare(&self) -> Result<()> {
        Ok(())
    }

    async fn insert(&self, _tx: &mut Tx, _m: &Message) -> std::result::Result<(), HandlerError> {
        Err(HandlerError::permanent(
            "this handler has no record table (a bug: a record: handler was built without its sink)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_the_url_is_never_shown() {
        let spec: HandlerSpec = "http:https://hook:s3cret@127.0.0.1:9/x".parse().unwrap();
        let shown = spec.to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.starts_with("http:https://hook:"), "{shown}");
    }

    #[tokio::test]
    async fn errors_about_the_endpoint_hide_its_password() {
        let client = reqwest::Client::new();
        let msg = Message::builder("t", "k", "T").build().unwrap();
        // port 9 (discard) is closed on loopback: the POST fails to connect
        let err = post(&client, "http://hook:s3cret@127.0.0.1:9/x", &msg)
            .await
            .unwrap_err();
        let text = format!("{err:?} {err}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("127.0.0.1:9"), "{text}");
    }

    #[test]
    fn parses_the_forms() {
        assert_eq!(
            "print".parse::<HandlerSpec>().ok(),
            Some(HandlerSpec::Print)
        );
        assert_eq!(
            "http:http://127.0.0.1:9/x".parse::<HandlerSpec>().ok(),
            Some(HandlerSpec::Http("http://127.0.0.1:9/x".to_owned()))
        );
        assert_eq!(
            "https://h/x".parse::<HandlerSpec>().ok(),
            Some(HandlerSpec::Http("https://h/x".to_owned()))
        );
        for bad in [
            "",
            "prin",
            "record:",
            "record:Orders",
            "record:a-b",
            "record:1a",
            "record:a;drop table x",
            "record:custody_outbox",
            "http:",
            "http:ftp://x",
            "http:http://",
        ] {
            let e = bad.parse::<HandlerSpec>();
            assert!(e.is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn header_values_are_percent_encoded() {
        assert_eq!(ce_value("a b\n%\"é"), "a%20b%0A%25%22%C3%A9");
        assert!(status_is_transient(503) && status_is_transient(429));
        assert!(!status_is_transient(400) && !status_is_transient(404));
    }
}
