//! CQRS projections' read-model side on SQLite
//! ([`custody_core::projection`]): generations, checkpoints, requests and
//! dead letters in `custody_projection*` (migration 0010), the runner's
//! transaction being [`SqliteInbox`]'s (`BEGIN IMMEDIATE`, fenced by the
//! consumer lease `projection:<name>`), and the operator's port
//! [`SqliteProjectionAdmin`]. The Rust is custody-sql's
//! [`custody_sql::projection_impl!`]; only what SQLite stores its own way
//! (times as Unix milliseconds, ids as text, booleans as 0/1) is here.
//!
//! SQLite's DDL is transactional, so the switch to a rebuilt generation
//! (drop and create the views, drop the old tables, move the pointer) is
//! one transaction: a reader sees the old read model or the new one.

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{Sqlite, SqlitePool};
use uuid::Uuid;

use crate::error::map_err;
use crate::{to_ms, SqliteInbox};

const DEAD_LETTER: &str = "INSERT INTO custody_projection_dead_letter \
     (name, generation, position, stream, stream_version, event_id, event_type, reason, failed_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
     ON CONFLICT (name, generation, position) DO UPDATE SET \
       reason = excluded.reason, failed_at = excluded.failed_at, retry_requested = 0";
const RETRIES: &str = "SELECT position FROM custody_projection_dead_letter \
     WHERE name = $1 AND generation = $2 AND retry_requested <> 0 ORDER BY position";

const STATUS: &str = custody_sql::projection_status_sql!("$1 IS NULL OR p.name = $1");

const RETRY: &str = "UPDATE custody_projection_dead_letter SET retry_requested = 1 \
     WHERE name = $1 AND generation = (SELECT active FROM custody_projection WHERE name = $1) \
       AND ($2 IS NULL OR position = $2)";

fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

// An id custody did not write reads as the nil id rather than failing the
// listing: the operator still sees the letter's position and reason.
fn parse_id(s: String) -> Uuid {
    s.parse().unwrap_or_else(|_| Uuid::nil())
}

fn flag(v: i64) -> bool {
    v != 0
}

custody_sql::projection_impl! {
    inbox: SqliteInbox,
    db: Sqlite,
    pool: SqlitePool,
    row: SqliteRow,
    backend: "sqlite",
    err: map_err,
    at: to_ms,
    time: i64 => from_ms,
    bind_id: ToString::to_string,
    id: String => parse_id,
    flag: i64 => flag,
    sql: {
        dead_letter: DEAD_LETTER,
        retries: RETRIES,
        status: STATUS,
        retry: RETRY,
    };

    /// The operator's port ([`custody_core::projection::ProjectionAdmin`])
    /// on a SQLite read-model database: status, requests, dead letters. It
    /// only writes requests; the active runner does the work.
    pub struct SqliteProjectionAdmin;
}
