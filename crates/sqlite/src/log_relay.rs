//! The state of relays that publish from the event log
//! ([`custody_core::log_relay`]) on SQLite: migration 0011's tables, in the
//! event store's database.
//!
//! Fencing needs no row lock: every write runs in a `BEGIN IMMEDIATE`
//! transaction, which holds the database's write lock from its first
//! statement (the holder and token check) to its commit. A takeover is a
//! write too, so it cannot happen between the check and the commit.
//!
//! The Rust is custody-sql's [`custody_sql::log_relay_impl!`]; here are the
//! fence, the statements SQLite spells its own way and how it stores times
//! (Unix milliseconds) and ids (text).

use std::time::Duration;

use chrono::{DateTime, Utc};
use custody_core::log_relay::{JournalEntry, JournalStatus};
use custody_core::Result;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection, SqlitePool};
use uuid::Uuid;

use crate::error::map_err;
use crate::{duration_ms, to_ms};

/// Read in `begin`'s `BEGIN IMMEDIATE` transaction, which holds the write
/// lock: no takeover (a write) can come between this read and the commit.
const LEASE: &str = "SELECT holder, lease_until, token FROM custody_log_relay WHERE relay = $1";
const SET_HEAD: &str =
    "INSERT INTO custody_log_relay_seq (relay, topic, last) VALUES ($1, $2, $3) \
     ON CONFLICT (relay, topic) DO UPDATE SET last = MAX(last, excluded.last)";
/// The checkpoint only rises.
const RAISE: &str =
    "UPDATE custody_log_relay SET checkpoint = MAX(checkpoint, $2), updated_at = $3 \
     WHERE relay = $1";
const PRUNE: &str = "DELETE FROM custody_log_relay_journal WHERE rowid IN ( \
     SELECT j.rowid FROM custody_log_relay_journal j JOIN custody_log_relay r ON r.relay = j.relay \
     WHERE j.relay = $1 AND j.position <= r.checkpoint AND j.status IN (1, 3) AND j.updated_at < $2 \
     LIMIT $3)";
const LOWER: &str = "UPDATE custody_log_relay SET checkpoint = MIN(checkpoint, $2), \
     token = token + 1, updated_at = $3 WHERE relay = $1";

/// A log relay's state on SQLite (see the module docs).
#[derive(Debug, Clone)]
pub struct SqliteLogRelayStore {
    pool: SqlitePool,
}

impl SqliteLogRelayStore {
    /// The log relay state in `pool`'s database (migrated with
    /// [`crate::migrate`]: it has migration 0011).
    pub fn new(pool: SqlitePool) -> Self {
        SqliteLogRelayStore { pool }
    }

    async fn begin(&self, op: &'static str) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err(op))
    }
}

fn from_ms(ms: Option<i64>) -> Option<DateTime<Utc>> {
    ms.and_then(DateTime::<Utc>::from_timestamp_millis)
}

fn uuid_of(s: &str, op: &'static str) -> Result<Uuid> {
    Uuid::parse_str(s).map_err(|e| {
        custody_core::Error::store(
            "sqlite",
            op,
            false,
            format!("custody_log_relay_journal holds {s:?}, not a UUID ({e}); the table was edited by hand"),
        )
    })
}

fn entry(row: &SqliteRow, op: &'static str) -> Result<(String, JournalEntry)> {
    let get = |e: sqlx::Error| map_err(op)(e);
    let event_id: String = row.try_get("event_id").map_err(get)?;
    let marker: Option<String> = row.try_get("marker_id").map_err(get)?;
    let position: i64 = row.try_get("position").map_err(get)?;
    let seq: Option<i64> = row.try_get("seq").map_err(get)?;
    Ok((
        row.try_get("relay").map_err(get)?,
        JournalEntry {
            position: u64::try_from(position).unwrap_or(0),
            event_id: uuid_of(&event_id, op)?,
            stream: row.try_get("stream").map_err(get)?,
            topic: row.try_get("topic").map_err(get)?,
            sequence: seq.and_then(|s| u64::try_from(s).ok()),
            status: JournalStatus::from_code(row.try_get("status").map_err(get)?),
            attempts: u32::try_from(row.try_get::<i64, _>("attempts").map_err(get)?).unwrap_or(0),
            republish: u32::try_from(row.try_get::<i64, _>("republish").map_err(get)?).unwrap_or(0),
            retry_at: from_ms(row.try_get("retry_at").map_err(get)?),
            error: row.try_get("error").map_err(get)?,
            marker_id: marker.as_deref().map(|m| uuid_of(m, op)).transpose()?,
            reference: row.try_get("ack_ref").map_err(get)?,
            published_at: from_ms(row.try_get("published_at").map_err(get)?),
        },
    ))
}

impl SqliteLogRelayStore {
    /// The stream and version of the event with id `id` in this database's
    /// event store (`custody trace`), `None` when it holds no such event.
    pub async fn locate_event(&self, id: Uuid) -> Result<Option<(String, u64)>> {
        let found: Option<(String, i64)> =
            sqlx::query_as("SELECT stream, version FROM custody_events WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(map_err("find event by id"))?;
        Ok(found.map(|(s, v)| (s, u64::try_from(v).unwrap_or(0))))
    }

    /// The database.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

fn expiry(now: DateTime<Utc>, ttl: Duration) -> i64 {
    to_ms(now).saturating_add(duration_ms(ttl))
}

// hyphenated lower-case UUIDs sort as their bytes, so a text range is an id range
fn text(id: &Uuid) -> String {
    id.hyphenated().to_string()
}

custody_sql::log_relay_impl! {
    store: SqliteLogRelayStore,
    conn: SqliteConnection,
    err: map_err,
    entry: entry,
    at: to_ms,
    time: i64,
    expiry: expiry,
    bind_id: text,
    status: std::convert::identity,
    count: i64::from,
    sql: {
        lease: LEASE,
        set_head: SET_HEAD,
        raise: RAISE,
        prune: PRUNE,
        lower: LOWER,
    },
}
