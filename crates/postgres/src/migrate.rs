//! custody's migrations on PostgreSQL, recorded in `custody_migrations`
//! (the runner is custody-sql's [`custody_sql::migrate_impl!`]; only the
//! table's types, the catalog lookup and the lock are PostgreSQL's).

use sqlx::migrate::Migrator;
use sqlx::{PgConnection, PgPool};

use crate::error::{db, retryable};

/// custody's migrations (`crates/postgres/migrations`), embedded.
pub(crate) static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Whether `custody_migrations`, `_sqlx_migrations` and `custody_outbox`
/// exist. `to_regclass` follows the search_path, as custody's statements
/// do: the tables custody would use, not some other schema's.
pub(crate) const TABLES: &str = "SELECT to_regclass('custody_migrations') IS NOT NULL, \
     to_regclass('_sqlx_migrations') IS NOT NULL, to_regclass('custody_outbox') IS NOT NULL";

/// Created only when missing (checked first): `CREATE TABLE IF NOT EXISTS`
/// would make PostgreSQL send an "already exists" notice on every run.
const CREATE: &str = "\
CREATE TABLE custody_migrations (
    version        BIGINT PRIMARY KEY,
    description    TEXT NOT NULL,
    installed_on   TIMESTAMPTZ NOT NULL DEFAULT now(),
    checksum       BYTEA NOT NULL,
    execution_time BIGINT NOT NULL
)";

/// Copy custody's row `$1` (checksum `$2`) of `_sqlx_migrations` as it is.
const ADOPT: &str = "\
INSERT INTO custody_migrations (version, description, installed_on, checksum, execution_time)
SELECT version, description, installed_on, checksum, execution_time
FROM _sqlx_migrations WHERE version = $1 AND checksum = $2";

/// Concurrent migrators of one database take turns on this advisory lock
/// (held by the session, for the whole run: migration 0002 runs outside a
/// transaction, `CREATE INDEX CONCURRENTLY`, so a transaction-scoped lock
/// could not cover it; the runner polls `pg_try_advisory_lock`, see
/// [`custody_sql::migrate_impl!`]). Advisory locks are per database, so one
/// constant key serves every database; its bytes spell `custodym`. It is not
/// sqlx's key: the application's own sqlx migrator does not wait for custody's.
const TRY_LOCK: &str = "SELECT pg_try_advisory_lock(7166761325952268653)";
const UNLOCK: &str = "SELECT pg_advisory_unlock(7166761325952268653)";

custody_sql::migrate_impl! {
    pool: PgPool,
    conn: PgConnection,
    backend: "postgres",
    err: db,
    retryable: retryable,
    migrator: MIGRATOR,
    tables: TABLES,
    create: CREATE,
    adopt: ADOPT,
    begin: "BEGIN",
    lock: Some((TRY_LOCK, UNLOCK)),
}
