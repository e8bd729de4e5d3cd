//! Mapping sqlx errors onto custody's error, with the retryable classification.

use custody_core::Error;

/// SQLSTATE codes that mean "try again": serialization_failure,
/// deadlock_detected, admin_shutdown, cannot_connect_now.
///
/// sqlx's portable `ErrorKind` only classifies constraint violations, so these
/// are read through `PgDatabaseError::code()`; this file is the one place
/// custody looks at SQLSTATE strings.
const RETRYABLE_SQLSTATES: [&str; 4] = ["40001", "40P01", "57P01", "57P03"];

/// SQLSTATE classes (the first two characters) that mean the data a
/// statement carried was refused, not that the database is in trouble:
/// 22 data exception (e.g. 22021, a NUL byte in TEXT; 22001, a value too
/// long), 23 integrity constraint violation, 54 program limit exceeded
/// (e.g. a row or index entry too big). Such an error is about the message
/// being stored: the consumer dead-letters it ([`custody_core::Error::is_about_message`]).
const ABOUT_DATA_CLASSES: [&str; 3] = ["22", "23", "54"];

/// Whether the error is PostgreSQL refusing the data a statement carried.
pub(crate) fn about_data(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Encode(_) => true,
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .is_some_and(|pg| ABOUT_DATA_CLASSES.iter().any(|c| pg.code().starts_with(c))),
        _ => false,
    }
}

/// Whether a later attempt can succeed.
pub(crate) fn retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .is_some_and(|pg| RETRYABLE_SQLSTATES.contains(&pg.code())),
        _ => false,
    }
}

/// A custody store error for operation `op`.
pub(crate) fn map_err(op: &'static str, e: sqlx::Error) -> Error {
    if about_data(&e) {
        return Error::rejected("postgres", op, e);
    }
    let retryable = retryable(&e);
    Error::store("postgres", op, retryable, e)
}

/// `.map_err(db(op))`.
pub(crate) fn db(op: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| map_err(op, e)
}

/// Connecting failed; names the URL (password redacted).
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {url}: {detail}; check that PostgreSQL is running there and that the URL, user and database are right")]
pub(crate) struct ConnectError {
    pub(crate) url: String,
    pub(crate) detail: String,
    #[source]
    pub(crate) source: Option<sqlx::Error>,
}
