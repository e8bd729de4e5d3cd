//! custody-postgres: the PostgreSQL backend of custody (not for direct use;
//! see `custody`). Transactional outbox with partition leases for several
//! relays, idempotent inbox, dead letters, an embedded transport that
//! reads the outbox as a log, and an event store ([`PgEventStore`]).
//!
//! ```no_run
//! use custody_core::Message;
//! use custody_postgres::{connect, migrate, PgOutbox};
//!
//! # async fn run() -> custody_core::Result<()> {
//! let pool = connect("postgres://postgres@127.0.0.1:5432/shop").await?;
//! migrate(&pool).await?;
//! let outbox = PgOutbox::new(pool.clone());
//!
//! // The message exists iff the business change commits.
//! let mut tx = pool.begin().await.map_err(|e| custody_core::Error::store("postgres", "begin", true, e))?;
//! // sqlx::query("INSERT INTO orders ...").execute(&mut *tx).await?;
//! let msg = Message::builder("orders", "order-1", "OrderPlaced").json(&serde_json::json!({"total": 990}))?.build()?;
//! let position = outbox.enqueue(&mut tx, &msg).await?;
//! tx.commit().await.map_err(|e| custody_core::Error::store("postgres", "commit", true, e))?;
//! # let _ = position;
//! # Ok(()) }
//! ```
//!
//! Invariant 5 of docs/ARCHITECTURE.md (no skipped commits): positions come from an
//! identity column assigned at insert, so a reader that keeps a cursor must
//! not go past a row whose transaction is still running. The embedded
//! subscriber only takes rows with `txid < pg_snapshot_xmin(pg_current_snapshot())`
//! and reads in `(txid, position)` order (see [`PgEmbeddedSubscriber`]); the
//! snapshot's xmin is cluster-wide, so a long transaction in any database of
//! the server delays it (never loses anything). The relay reads pending rows
//! by status, not past a cursor: a late-committing row is pending on its next
//! call, so it needs no guard and does not wait for transactions in flight.
#![forbid(unsafe_code)]

mod admin;
mod check;
mod consumer_lease;
mod error;
mod eventstore;
mod history;
mod inbox;
mod migrate;
mod outbox;
mod row;
mod secure;
mod subscriber;
mod wake;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub use admin::{dead_letters, PgAdmin, DRIVER};
pub use check::{check_schema, consumer_seen, consumers, topic_seen, topics};
pub use custody_core::{LeaseLost, RedriveOutcome};
pub use eventstore::{PgEventStore, WriteStats, DEFAULT_EVENT_POLL_INTERVAL};
pub use history::{dead_letter_rows, purge, redrive, rewind_checkpoint, status};
pub use inbox::PgInbox;
pub use migrate::migrate;
pub use outbox::{PgOutbox, DEFAULT_NOTIFY_INTERVAL, DEFAULT_PARTITIONS};
pub use secure::PASSWORD_FILE_ENV;
pub use subscriber::{checkpoint, set_checkpoint, PgEmbeddedSubscriber};

use error::ConnectError;

/// Default pool size of [`connect`].
const POOL_SIZE: u32 = 10;
/// How long [`connect`] waits for the first connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Open a connection pool to `url` (`postgres://user:password@host:port/db`).
///
/// The pool holds up to 10 connections and waits at most 10 s for one. The
/// first connection is made at once, so a wrong URL or a server that is down
/// is reported here, naming the URL (without its password) and what the
/// failure means: a refused connection (at once, not after the timeout), a
/// database that does not exist (and how to create it), a refused user. A
/// URL of another database (`mysql://…`) is refused, naming the accepted forms.
///
/// TLS: `sslmode=require|verify-ca|verify-full`, `sslrootcert`, `sslcert`,
/// `sslkey` in the URL (rustls; docs/SECURITY.md). The password may stay
/// out of the URL: the file named by [`PASSWORD_FILE_ENV`], then
/// `PGPASSWORD`, then `PGPASSFILE` / `~/.pgpass`. A wrong password or a
/// certificate that does not verify is a terminal error naming the link.
pub async fn connect(url: &str) -> custody_core::Result<PgPool> {
    if !admin::accepts(url) {
        return Err(custody_core::admin::unsupported_url(url, DRIVER.forms));
    }
    let shown = custody_core::redact_url(url);
    let options: PgConnectOptions = url.parse().map_err(|e| {
        custody_core::Error::Config(format!(
            "{shown} is not a PostgreSQL URL ({e}); expected postgres://user:password@host:port/database"
        ))
    })?;
    let options = secure::prepare(url, &shown, options)?;
    // one direct connection first: a refused one is reported at once, and clearly
    error::probe(&options, &shown, CONNECT_TIMEOUT).await?;
    let connecting = PgPoolOptions::new()
        .max_connections(POOL_SIZE)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(pool)) => Ok(pool),
        // the probe above reported refusals (password, pg_hba, TLS); what
        // is left is the server going away between the two connections
        Ok(Err(e)) => {
            let retryable = error::retryable(&e);
            Err(custody_core::Error::store(
                "postgres",
                "connect",
                retryable,
                ConnectError {
                    url: shown,
                    detail: e.to_string(),
                    source: Some(e),
                },
            ))
        }
        Err(_) => Err(custody_core::Error::store(
            "postgres",
            "connect",
            true,
            ConnectError {
                url: shown,
                detail: format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()),
                source: None,
            },
        )),
    }
}

/// Open an existing custody database for the operator commands, never
/// creating or migrating anything: [`connect`], then [`check_schema`].
///
/// A database that does not exist fails in [`connect`] (PostgreSQL never
/// creates one on connect); one without custody's tables, or with an older
/// schema, is an error saying so, and nothing is written to it.
pub async fn open_existing(url: &str) -> custody_core::Result<PgPool> {
    let pool = connect(url).await?;
    check_schema(&pool).await?;
    Ok(pool)
}
