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

/// Primary result codes of opening a database: the file cannot be opened
/// (a missing directory, permissions), or it is not a SQLite database.
const SQLITE_CANTOPEN: i32 = 14;
const SQLITE_NOTADB: i32 = 26;

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

/// Opening database `file` failed: say why in the user's terms (a missing
/// directory, a file that is not a database) when the code tells.
pub(crate) fn connect_error(file: &std::path::Path, e: sqlx::Error) -> Error {
    let code = match &e {
        sqlx::Error::Database(db) => db.code().and_then(|c| c.parse::<i32>().ok()),
        _ => None,
    };
    match code.map(|c| c & 0xff) {
        Some(SQLITE_NOTADB) => Error::Config(format!(
            "{} is not a SQLite database (SQLite: {}); check the path: custody opens only a \
             SQLite file, or creates one where none exists",
            file.display(),
            e
        )),
        Some(SQLITE_CANTOPEN) => {
            let dir = file.parent().filter(|d| !d.as_os_str().is_empty());
            match dir {
                Some(dir) if !dir.exists() => Error::Config(format!(
                    "cannot open SQLite database {}: directory {} does not exist; create it \
                     (`mkdir -p {}`) or fix the path",
                    file.display(),
                    dir.display(),
                    dir.display()
                )),
                _ => Error::Config(format!(
                    "cannot open SQLite database {} ({}); check that the path names a file \
                     (not a directory) and that this user may read and write it and its directory",
                    file.display(),
                    e
                )),
            }
        }
        _ => store_error("connect", e),
    }
}
