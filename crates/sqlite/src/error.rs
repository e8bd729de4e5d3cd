//! The one place sqlx errors become custody errors.

use custody_core::Error;

const BACKEND: &str = "sqlite";

/// Primary result codes (the low byte of an extended code) that mean another
/// connection holds a lock: trying again later can succeed.
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;

/// Primary result codes that mean the data a statement carried was refused:
/// a string or blob too big, a constraint violated, a datatype mismatch.
/// Such an error is about the message being stored: the consumer
/// dead-letters it ([`custody_core::Error::is_about_message`]).
const SQLITE_TOOBIG: i32 = 18;
const SQLITE_CONSTRAINT: i32 = 19;
const SQLITE_MISMATCH: i32 = 20;

/// Whether the error is SQLite refusing the data a statement carried.
pub(crate) fn about_data(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Encode(_) => true,
        sqlx::Error::Database(db) => {
            db.code()
                .and_then(|c| c.parse::<i32>().ok())
                .is_some_and(|c| {
                    matches!(
                        c & 0xff,
                        SQLITE_TOOBIG | SQLITE_CONSTRAINT | SQLITE_MISMATCH
                    )
                })
        }
        _ => false,
    }
}

/// Whether `e` is worth retrying: I/O, pool exhaustion, or the database being
/// busy/locked by another connection. Everything else (constraint violations,
/// SQL errors, decode errors, a closed pool) is terminal.
pub(crate) fn retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| matches!(c & 0xff, SQLITE_BUSY | SQLITE_LOCKED)),
        _ => false,
    }
}

/// Convert an sqlx error from operation `op`.
pub(crate) fn store_error(op: &'static str, e: sqlx::Error) -> Error {
    if about_data(&e) {
        return Error::rejected(BACKEND, op, e);
    }
    Error::store(BACKEND, op, retryable(&e), e)
}

/// `map_err` adapter for [`store_error`].
pub(crate) fn map_err(op: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| store_error(op, e)
}

/// Migration errors: retryable only when the database was busy.
pub(crate) fn map_migrate_err(e: sqlx::migrate::MigrateError) -> Error {
    match e {
        sqlx::migrate::MigrateError::Execute(inner) => store_error("migrate", inner),
        other => Error::store(BACKEND, "migrate", false, other),
    }
}
