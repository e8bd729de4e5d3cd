//! CQRS projections' read-model side on PostgreSQL
//! ([`custody_core::projection`]): generations, checkpoints, requests and
//! dead letters in `custody_projection*` (migration 0013), the runner's
//! transaction being [`PgInbox`]'s (fenced by the consumer lease
//! `projection:<name>`, held FOR SHARE until it ends), and the operator's
//! port [`PgProjectionAdmin`]. The Rust is custody-sql's
//! [`custody_sql::projection_impl!`]; only the statements PostgreSQL spells
//! its own way (booleans, typed NULL parameters) are here.
//!
//! PostgreSQL's DDL is transactional, so the switch to a rebuilt generation
//! (drop and create the views, drop the old tables, move the pointer) is
//! one transaction: a reader sees the old read model or the new one
//! (`DROP VIEW` takes the view's ACCESS EXCLUSIVE lock, so a query on the
//! view waits for the switch to commit and then reads the new generation).
//!
//! The runner is the only writer of these rows except the operator's
//! request columns (`custody projection rebuild|reset|retry`), which the
//! runner's own updates never overwrite: `REPORT` and `SET_ACTIVE` set
//! other columns, and under READ COMMITTED a concurrent request only waits
//! for the row lock.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres};
use uuid::Uuid;

use crate::error::db as map_err;
use crate::PgInbox;

const DEAD_LETTER: &str = "INSERT INTO custody_projection_dead_letter \
     (name, generation, position, stream, stream_version, event_id, event_type, reason, failed_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
     ON CONFLICT (name, generation, position) DO UPDATE SET \
       reason = excluded.reason, failed_at = excluded.failed_at, retry_requested = FALSE";
const RETRIES: &str = "SELECT position FROM custody_projection_dead_letter \
     WHERE name = $1 AND generation = $2 AND retry_requested ORDER BY position";

const STATUS: &str = custody_sql::projection_status_sql!("$1::text IS NULL OR p.name = $1");

const RETRY: &str = "UPDATE custody_projection_dead_letter SET retry_requested = TRUE \
     WHERE name = $1 AND generation = (SELECT active FROM custody_projection WHERE name = $1) \
       AND ($2::bigint IS NULL OR position = $2)";

custody_sql::projection_impl! {
    inbox: PgInbox,
    db: Postgres,
    pool: PgPool,
    row: PgRow,
    backend: "postgres",
    err: map_err,
    at: std::convert::identity,
    time: DateTime<Utc> => std::convert::identity,
    bind_id: Clone::clone,
    id: Uuid => std::convert::identity,
    flag: bool => std::convert::identity,
    sql: {
        dead_letter: DEAD_LETTER,
        retries: RETRIES,
        status: STATUS,
        retry: RETRY,
    };

    /// The operator's port ([`custody_core::projection::ProjectionAdmin`])
    /// on a PostgreSQL read-model database: status, requests, dead letters.
    /// It only writes requests; the active runner does the work.
    pub struct PgProjectionAdmin;
}
