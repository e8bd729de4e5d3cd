//! custody's migrations on SQLite, recorded in `custody_migrations` (the
//! runner is custody-sql's [`custody_sql::migrate_impl!`]; only the table's
//! types, the catalog lookup and the transaction mode are SQLite's).

use sqlx::migrate::Migrator;
use sqlx::{SqliteConnection, SqlitePool};

use crate::error::{map_err, retryable};

/// custody's migrations (`crates/sqlite/migrations`), embedded.
pub(crate) static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Whether `custody_migrations`, `_sqlx_migrations` and `custody_outbox` exist.
pub(crate) const TABLES: &str = "SELECT \
    EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'custody_migrations'), \
    EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'), \
    EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'custody_outbox')";

/// `installed_on` in unix milliseconds, as every custody timestamp on
/// SQLite (docs/SCHEMA.md); julianday works on every SQLite version.
const CREATE: &str = "\
CREATE TABLE custody_migrations (
    version        INTEGER PRIMARY KEY,
    description    TEXT NOT NULL,
    installed_on   INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    checksum       BLOB NOT NULL,
    execution_time INTEGER NOT NULL
)";

/// Copy custody's row `$1` (checksum `$2`) of `_sqlx_migrations`, its
/// `installed_on` (sqlx's `YYYY-MM-DD HH:MM:SS`, UTC) turned into unix ms.
const ADOPT: &str = "\
INSERT INTO custody_migrations (version, description, installed_on, checksum, execution_time)
SELECT version, description,
       COALESCE(CAST((julianday(installed_on) - 2440587.5) * 86400000 AS INTEGER),
                CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
       checksum, execution_time
FROM _sqlx_migrations WHERE version = $1 AND checksum = $2";

custody_sql::migrate_impl! {
    pool: SqlitePool,
    conn: SqliteConnection,
    backend: "sqlite",
    err: map_err,
    retryable: retryable,
    migrator: MIGRATOR,
    tables: TABLES,
    create: CREATE,
    adopt: ADOPT,
    // the write lock first: concurrent migrators (processes) take turns
    begin: "BEGIN IMMEDIATE",
    lock: None,
}
