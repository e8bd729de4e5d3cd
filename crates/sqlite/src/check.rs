//! Read-only checks for the operator commands (`custody reconcile`, `trace`,
//! `dlq`): is this custody's database, with its schema up to date, and has it
//! ever seen a topic or a consumer name? None of them creates or changes
//! anything: a check never writes to what it checks (docs/ARCHITECTURE.md invariant 8).
//! The statements and functions are custody-sql's; only the catalog lookup
//! ([`crate::migrate`]'s `TABLES`) is SQLite's.

use sqlx::SqlitePool;

use crate::error::map_err;
use crate::migrate::{MIGRATOR, TABLES};

custody_sql::checks_impl! {
    pool: SqlitePool,
    err: map_err,
    tables: TABLES,
    migrator: MIGRATOR,
    names: ("path", "path"),
}
