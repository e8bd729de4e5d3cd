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

/// The first connection ([`probe`]) failed: `detail` says what happened
/// and what to do, naming the server (never the password).
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
pub(crate) struct ProbeError {
    detail: String,
    #[source]
    source: Option<sqlx::Error>,
}

/// SQLSTATE 3D000 invalid_catalog_name: the database does not exist.
const NO_SUCH_DATABASE: &str = "3D000";
/// SQLSTATE class 28, invalid authorization: a wrong password, a role that
/// does not exist, no pg_hba.conf entry.
const AUTH_CLASS: &str = "28";

/// Connect once, directly, before a pool is built: a pool retries a refused
/// connection until its timeout (10 s of `pool timed out`); one connection
/// reports the real cause at once. Then the error says what it means: a
/// refused connection, a database that does not exist, a refused user, or
/// no answer within `timeout` (an unreachable host).
pub(crate) async fn probe(
    options: &sqlx::postgres::PgConnectOptions,
    shown: &str,
    timeout: std::time::Duration,
) -> custody_core::Result<()> {
    use sqlx::Connection as _;
    let at = match options.get_socket() {
        Some(socket) => socket.display().to_string(),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    };
    let user = options.get_username();
    let database = options.get_database().unwrap_or(user);
    let fail = |retryable: bool, detail: String, source: Option<sqlx::Error>| {
        Error::store(
            "postgres",
            "connect",
            retryable,
            ProbeError { detail, source },
        )
    };
    let e = match tokio::time::timeout(timeout, sqlx::PgConnection::connect_with(options)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            return Ok(());
        }
        Err(_) => {
            return Err(fail(
                true,
                format!(
                    "no answer from {at} within {}s: is the host reachable (address, firewall)? ({shown})",
                    timeout.as_secs()
                ),
                None,
            ))
        }
        Ok(Err(e)) => e,
    };
    // a password, pg_hba or TLS refusal: terminal, with what to fix
    if let Some(refused) = crate::secure::refused(shown, &e) {
        return Err(Error::store("postgres", "connect", false, refused));
    }
    let code = match &e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    };
    let detail = match (&e, code.as_deref()) {
        (sqlx::Error::Io(io), _) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!("connection refused at {at}: is PostgreSQL running there? ({shown})")
        }
        (_, Some(NO_SUCH_DATABASE)) => format!(
            "database {database:?} does not exist on the PostgreSQL server at {at}; create it \
             (`createdb -h {host} -p {port} -U {user} {database}`, or `CREATE DATABASE \
             \"{database}\"` in psql) or fix the database name in {shown}",
            host = options.get_host(),
            port = options.get_port(),
        ),
        (sqlx::Error::Database(db), Some(c)) if c.starts_with(AUTH_CLASS) => format!(
            "PostgreSQL at {at} refused user {user:?}: {}; check the user and password in \
             {shown} (and the server's pg_hba.conf)",
            db.message()
        ),
        _ => format!(
            "cannot connect to {shown}: {e}; check that PostgreSQL is running there and that \
             the URL, user and database are right"
        ),
    };
    Err(fail(retryable(&e), detail, Some(e)))
}
