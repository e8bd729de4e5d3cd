//! Read-only checks for the operator commands (`custody reconcile`, `trace`,
//! `dlq`): is this custody's database, with its schema up to date, and has it
//! ever seen a topic or a consumer name? None of them creates or changes
//! anything: a check never writes to what it checks (docs/ARCHITECTURE.md invariant 8).
//! The statements and functions are custody-sql's; only the catalog lookup
//! is PostgreSQL's.

use sqlx::migrate::Migrator;
use sqlx::PgPool;

use crate::error::db;

/// custody's migrations, to compare with what the database has applied.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

// to_regclass follows the search_path, as sqlx's migrator and custody's
// statements do: the tables custody would use, not some other schema's.
const TABLES_PRESENT: &str = "\
SELECT to_regclass('_sqlx_migrations') IS NOT NULL, to_regclass('custody_outbox') IS NOT NULL";

custody_sql::checks_impl! {
    pool: PgPool,
    err: db,
    tables_present: TABLES_PRESENT,
    migrator: MIGRATOR,
    names: ("database name", "URL"),
}
