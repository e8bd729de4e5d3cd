//! The state of relays that publish from the event log
//! ([`custody_core::log_relay`]) on PostgreSQL: migration 0014's tables, in
//! the event store's database.
//!
//! Fencing: every write of a holder first reads its relay's row `FOR
//! UPDATE` and checks holder and token. A takeover is an UPDATE of that row,
//! so it waits until the write's transaction ends, and every write that
//! starts after it sees the new token and is refused. The lease decision
//! itself also runs under that row lock, so two processes racing for a free
//! lease cannot both take it.
//!
//! The Rust is custody-sql's [`custody_sql::log_relay_impl!`]; here are the
//! fence, the statements PostgreSQL spells its own way and its column types.

use std::time::Duration;

use chrono::{DateTime, Utc};
use custody_core::log_relay::{JournalEntry, JournalStatus};
use custody_core::Result;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::error::db as map_err;

/// The row lock every lease decision and every fenced write takes first.
const LEASE: &str =
    "SELECT holder, lease_until, token FROM custody_log_relay WHERE relay = $1 FOR UPDATE";
const SET_HEAD: &str =
    "INSERT INTO custody_log_relay_seq (relay, topic, last) VALUES ($1, $2, $3) \
     ON CONFLICT (relay, topic) DO UPDATE SET last = GREATEST(custody_log_relay_seq.last, excluded.last)";
/// The checkpoint only rises.
const RAISE: &str =
    "UPDATE custody_log_relay SET checkpoint = GREATEST(checkpoint, $2), updated_at = $3 \
     WHERE relay = $1";
const PRUNE: &str = "DELETE FROM custody_log_relay_journal WHERE relay = $1 AND position IN ( \
     SELECT j.position FROM custody_log_relay_journal j JOIN custody_log_relay r ON r.relay = j.relay \
     WHERE j.relay = $1 AND j.position <= r.checkpoint AND j.status IN (1, 3) AND j.updated_at < $2 \
     LIMIT $3)";
const LOWER: &str = "UPDATE custody_log_relay SET checkpoint = LEAST(checkpoint, $2), \
     token = token + 1, updated_at = $3 WHERE relay = $1";

/// A log relay's state on PostgreSQL (see the module docs).
#[derive(Debug, Clone)]
pub struct PgLogRelayStore {
    pool: PgPool,
}

impl PgLogRelayStore {
    /// The log relay state in `pool`'s database (migrated with
    /// [`crate::migrate`]: it has migration 0014).
    pub fn new(pool: PgPool) -> Self {
        PgLogRelayStore { pool }
    }

    async fn begin(&self, op: &'static str) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        self.pool.begin().await.map_err(map_err(op))
    }
}

fn entry(row: &PgRow, op: &'static str) -> Result<(String, JournalEntry)> {
    let get = |e: sqlx::Error| map_err(op)(e);
    let position: i64 = row.try_get("position").map_err(get)?;
    let seq: Option<i64> = row.try_get("seq").map_err(get)?;
    Ok((
        row.try_get("relay").map_err(get)?,
        JournalEntry {
            position: u64::try_from(position).unwrap_or(0),
            event_id: row.try_get("event_id").map_err(get)?,
            stream: row.try_get("stream").map_err(get)?,
            topic: row.try_get("topic").map_err(get)?,
            sequence: seq.and_then(|s| u64::try_from(s).ok()),
            status: JournalStatus::from_code(i64::from(
                row.try_get::<i16, _>("status").map_err(get)?,
            )),
            attempts: u32::try_from(row.try_get::<i32, _>("attempts").map_err(get)?).unwrap_or(0),
            republish: u32::try_from(row.try_get::<i32, _>("republish").map_err(get)?).unwrap_or(0),
            retry_at: row.try_get("retry_at").map_err(get)?,
            error: row.try_get("error").map_err(get)?,
            marker_id: row.try_get("marker_id").map_err(get)?,
            reference: row.try_get("ack_ref").map_err(get)?,
            published_at: row.try_get("published_at").map_err(get)?,
        },
    ))
}

impl PgLogRelayStore {
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
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn expiry(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(ttl)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn status(code: i64) -> i16 {
    code as i16
}

fn count(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

custody_sql::log_relay_impl! {
    store: PgLogRelayStore,
    conn: PgConnection,
    err: map_err,
    entry: entry,
    at: std::convert::identity,
    time: DateTime<Utc>,
    expiry: expiry,
    bind_id: Clone::clone,
    status: status,
    count: count,
    sql: {
        lease: LEASE,
        set_head: SET_HEAD,
        raise: RAISE,
        prune: PRUNE,
        lower: LOWER,
    },
}
