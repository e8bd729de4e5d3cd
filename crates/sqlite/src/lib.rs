//! custody's SQLite backend: transactional outbox, idempotent inbox, dead
//! letters, relay leases and the embedded transport (readers of the outbox
//! log). Not for direct use; see the `custody` facade crate.
//!
//! ```
//! use chrono::{SubsecRound, Utc};
//! use custody_core::{Message, OutboxStore};
//! use custody_sqlite::SqliteOutbox;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let pool = custody_sqlite::connect(&dir.path().join("app.db").to_string_lossy()).await?;
//! custody_sqlite::migrate(&pool).await?;
//! let outbox = SqliteOutbox::new(pool.clone());
//!
//! // The business change and the message commit together, or not at all.
//! let mut tx = pool.begin().await?;
//! sqlx::query("CREATE TABLE orders (id INTEGER PRIMARY KEY)").execute(&mut *tx).await?;
//! sqlx::query("INSERT INTO orders (id) VALUES (1)").execute(&mut *tx).await?;
//! let msg = Message::builder("orders", "order-1", "OrderPlaced")
//!     .created_at(Utc::now().trunc_subsecs(3)) // stored to the millisecond
//!     .json(&1)?
//!     .build()?;
//! let position = outbox.enqueue(&mut tx, &msg).await?;
//! tx.commit().await?;
//!
//! // The relay sees the committed message.
//! let all: Vec<u32> = (0..outbox.partitions()).collect();
//! let batch = outbox.fetch_batch(&all, 100, Utc::now()).await?;
//! assert_eq!(batch.len(), 1);
//! assert_eq!(batch[0].position, position);
//! assert_eq!(batch[0].message, msg);
//! # Ok(())
//! # }
//! ```
//!
//! # Storage
//!
//! Timestamps are stored as unix milliseconds (docs/SCHEMA.md): a message's
//! `created_at` comes back cut to the millisecond.
//!
//! # Ordering
//!
//! SQLite lets one write transaction run at a time and holds the write lock
//! from the transaction's first write until its commit, so outbox positions
//! (assigned at insert) become visible in commit order. Readers can use
//! `WHERE position > last` without the visibility guard PostgreSQL needs
//! (docs/ARCHITECTURE.md invariant 5).
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
mod producer;
mod row;
mod subscriber;

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

pub use admin::{checkpoint, dead_letters, set_checkpoint, SqliteAdmin, DRIVER};
pub use check::{check_schema, consumer_seen, consumers, topic_seen, topics};
pub use custody_core::RedriveOutcome;
pub use eventstore::{SqliteEventStore, WriteStats};
pub use history::{dead_letter_rows, purge, redrive, rewind_checkpoint, status};
pub use inbox::SqliteInbox;
pub use migrate::migrate;
pub use outbox::{SqliteOutbox, DEFAULT_PARTITIONS};
pub use subscriber::SqliteEmbeddedSubscriber;

/// Connection settings for [`connect_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqliteSettings {
    /// `PRAGMA synchronous = FULL` (default) rather than `NORMAL`. In WAL mode
    /// `NORMAL` may lose the last commits on power loss (not on a process
    /// crash); custody's "no loss" promise needs `FULL`.
    pub synchronous_full: bool,
    /// Most connections the pool opens (default 8).
    pub max_connections: u32,
    /// How long a statement waits for another connection's write lock before
    /// failing with a (retryable) busy error (default 10 s).
    pub busy_timeout: Duration,
}

impl Default for SqliteSettings {
    fn default() -> Self {
        SqliteSettings {
            synchronous_full: true,
            max_connections: 8,
            busy_timeout: Duration::from_secs(10),
        }
    }
}

/// Open a pool on `url_or_path` with [`SqliteSettings::default`].
///
/// Accepts `sqlite://path/to/file.db`, `sqlite::memory:` and other sqlx
/// SQLite urls, or a plain file path. The file is created if missing; the
/// database runs in WAL mode with foreign keys on. A directory that does not
/// exist, a file that is not a SQLite database, or a URL of another
/// database (`mysql://…`) is an error saying so.
pub async fn connect(url_or_path: &str) -> custody_core::Result<SqlitePool> {
    connect_with(url_or_path, SqliteSettings::default()).await
}

/// Open a pool on `url_or_path` (see [`connect`]) with `opts`.
pub async fn connect_with(
    url_or_path: &str,
    opts: SqliteSettings,
) -> custody_core::Result<SqlitePool> {
    let base = parse_options(url_or_path)?;
    let file = base.get_filename().to_owned();
    let options = base
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(opts.busy_timeout)
        .foreign_keys(true)
        // sqlx's worker thread hands rows over through a channel of this
        // many; its default of 50 makes a page read of thousands of events
        // (the event store's read_all) wait on the reader every 50 rows
        .row_buffer_size(1024)
        .synchronous(if opts.synchronous_full {
            SqliteSynchronous::Full
        } else {
            SqliteSynchronous::Normal
        });
    SqlitePoolOptions::new()
        .max_connections(opts.max_connections.max(1))
        .connect_with(options)
        .await
        .map_err(|e| error::connect_error(&file, e))
}

/// Open an existing custody database for the operator commands, never
/// creating or migrating anything: `url_or_path` as for [`connect`], with
/// [`SqliteSettings::default`].
///
/// A file that does not exist is an error naming it (a mistyped path must
/// not become a fresh, empty database that checks report clean); so is a
/// database without custody's tables or with an older schema
/// ([`check_schema`]). The journal mode is left as it is (custody's
/// databases are in WAL mode since their creation).
pub async fn open_existing(url_or_path: &str) -> custody_core::Result<SqlitePool> {
    let base = parse_options(url_or_path)?;
    let in_memory = base.get_filename().to_string_lossy().contains(":memory:")
        || url_or_path.contains(":memory:");
    if !in_memory && !base.get_filename().exists() {
        return Err(custody_core::Error::Config(format!(
            "SQLite database {} does not exist; check the path (this command never creates a database; `custody migrate --db …` does)",
            base.get_filename().display()
        )));
    }
    let opts = SqliteSettings::default();
    let file = base.get_filename().to_owned();
    let options = base
        .create_if_missing(false)
        .busy_timeout(opts.busy_timeout)
        .foreign_keys(true)
        .synchronous(SqliteSynchronous::Full);
    let pool = SqlitePoolOptions::new()
        .max_connections(opts.max_connections)
        .connect_with(options)
        .await
        .map_err(|e| error::connect_error(&file, e))?;
    check_schema(&pool).await?;
    Ok(pool)
}

/// `sqlite:` urls parsed by sqlx, anything else without a `scheme://` a
/// plain path. Another scheme (`mysql://…`) is refused, naming the accepted
/// forms: never taken for a file name.
fn parse_options(url_or_path: &str) -> custody_core::Result<SqliteConnectOptions> {
    if !admin::accepts(url_or_path) {
        return Err(custody_core::admin::unsupported_url(
            url_or_path,
            DRIVER.forms,
        ));
    }
    if url_or_path.starts_with("sqlite:") {
        SqliteConnectOptions::from_str(url_or_path).map_err(|e| {
            custody_core::Error::Config(format!(
                "SQLite url {url_or_path:?} is not valid ({e}); use sqlite://path/to/file.db or a plain path"
            ))
        })
    } else {
        Ok(SqliteConnectOptions::new().filename(url_or_path))
    }
}

/// Milliseconds since the Unix epoch, the storage form of every timestamp.
pub(crate) fn to_ms(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_millis()
}

/// A `Duration` in milliseconds, saturating.
pub(crate) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
