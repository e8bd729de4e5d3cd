//! Read-only checks for the operator commands (`custody reconcile`, `trace`,
//! `dlq`): is this custody's database, with its schema up to date, and has it
//! ever seen a topic or a consumer name? None of them creates or changes
//! anything: a check never writes to what it checks (docs/ARCHITECTURE.md invariant 8).
//! The statements and functions are custody-sql's; only the catalog lookup
//! is SQLite's.

use sqlx::migrate::Migrator;
use sqlx::SqlitePool;

use crate::error::map_err;

/// custody's migrations, to compare with what the database has applied.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

const TABLES_PRESENT: &str = "SELECT \
    EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'), \
    EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'custody_outbox')";

custody_sql::checks_impl! {
    pool: SqlitePool,
    err: map_err,
    tables_present: TABLES_PRESENT,
    migrator: MIGRATOR,
    names: ("path", "path"),
}
