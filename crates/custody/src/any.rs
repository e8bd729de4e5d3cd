//! The registry's backends behind one type for the operations commands:
//! an outbox to enqueue into ([`AnyOutbox`], `custody produce`) and the
//! embedded transport's reader of a producer's outbox
//! ([`EmbeddedSubscriber`], `custody consume --outbox`), each opened by URL
//! with one line per backend here, so callers never match on a backend.

use std::time::Duration;

use custody_core::{admin, Delivery, Error, Message, Result, Subscriber};

use crate::drivers;

/// An outbox of any backend compiled in, opened by URL ([`open_outbox`]).
#[derive(Debug, Clone)]
pub struct AnyOutbox(OutboxOf);

#[derive(Debug, Clone)]
enum OutboxOf {
    #[cfg(feature = "sqlite")]
    Sqlite(custody_sqlite::SqliteOutbox),
    #[cfg(feature = "postgres")]
    Postgres(custody_postgres::PgOutbox),
}

/// Open the outbox of the database at `url` (any backend compiled in),
/// connected and migrated, for enqueueing outside an application (tests,
/// scripts, `custody produce`). An application enqueues in its own
/// transaction instead (`SqliteOutbox::enqueue`, `PgOutbox::enqueue`).
pub async fn open_outbox(url: &str) -> Result<AnyOutbox> {
    let driver = admin::driver_for(&drivers(), url)?;
    #[cfg(feature = "postgres")]
    if driver.name == custody_postgres::DRIVER.name {
        let pool = custody_postgres::connect(url).await?;
        custody_postgres::migrate(&pool).await?;
        return Ok(AnyOutbox(OutboxOf::Postgres(
            custody_postgres::PgOutbox::new(pool),
        )));
    }
    #[cfg(feature = "sqlite")]
    if driver.name == custody_sqlite::DRIVER.name {
        let pool = custody_sqlite::connect(url).await?;
        custody_sqlite::migrate(&pool).await?;
        return Ok(AnyOutbox(OutboxOf::Sqlite(
            custody_sqlite::SqliteOutbox::new(pool),
        )));
    }
    Err(Error::Config(format!(
        "backend {} has no outbox in this build",
        driver.name
    )))
}

impl AnyOutbox {
    /// Enqueue `messages` in one transaction of their own (all or none);
    /// returns their outbox positions, in order.
    pub async fn enqueue_batch(&self, messages: &[Message]) -> Result<Vec<i64>> {
        match &self.0 {
            #[cfg(feature = "sqlite")]
            OutboxOf::Sqlite(o) => {
                let mut tx = o
                    .pool()
                    .begin()
                    .await
                    .map_err(tx_error("sqlite", "begin"))?;
                let positions = o.enqueue_batch(&mut tx, messages).await?;
                tx.commit().await.map_err(tx_error("sqlite", "commit"))?;
                Ok(positions)
            }
            #[cfg(feature = "postgres")]
            OutboxOf::Postgres(o) => {
                let mut tx = o
                    .pool()
                    .begin()
                    .await
                    .map_err(tx_error("postgres", "begin"))?;
                let positions = o.enqueue_batch(&mut tx, messages).await?;
                tx.commit().await.map_err(tx_error("postgres", "commit"))?;
                Ok(positions)
            }
        }
    }
}

fn tx_error(backend: &'static str, op: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| Error::store(backend, op, true, e)
}

/// The embedded transport on any backend compiled in: a reader of a
/// producer's outbox as a log, by subscription name, from its stored
/// checkpoint ([`open_embedded`]).
#[derive(Debug)]
pub struct EmbeddedSubscriber(SubscriberOf);

#[derive(Debug)]
enum SubscriberOf {
    #[cfg(feature = "sqlite")]
    Sqlite(custody_sqlite::SqliteEmbeddedSubscriber),
    #[cfg(feature = "postgres")]
    Postgres(custody_postgres::PgEmbeddedSubscriber),
}

/// Read `topics` (every topic when empty) of the outbox in the producer's
/// database at `url` (any backend compiled in) as subscription
/// `subscription`, after its stored checkpoint. The database is opened as
/// it is: it must exist and hold custody's tables (a mistyped path is an
/// error, not a new empty outbox).
pub async fn open_embedded(
    url: &str,
    subscription: &str,
    topics: &[String],
) -> Result<EmbeddedSubscriber> {
    let driver = admin::driver_for(&drivers(), url)?;
    #[cfg(feature = "postgres")]
    if driver.name == custody_postgres::DRIVER.name {
        let pool = custody_postgres::open_existing(url).await?;
        let sub = custody_postgres::PgEmbeddedSubscriber::new(pool, subscription, topics).await?;
        return Ok(EmbeddedSubscriber(SubscriberOf::Postgres(sub)));
    }
    #[cfg(feature = "sqlite")]
    if driver.name == custody_sqlite::DRIVER.name {
        let pool = custody_sqlite::open_existing(url).await?;
        let sub = custody_sqlite::SqliteEmbeddedSubscriber::new(pool, subscription, topics).await?;
        return Ok(EmbeddedSubscriber(SubscriberOf::Sqlite(sub)));
    }
    let _ = (subscription, topics);
    Err(Error::Config(format!(
        "backend {} has no embedded transport in this build",
        driver.name
    )))
}

impl Subscriber for EmbeddedSubscriber {
    /// The outbox position of the delivered row.
    type Token = i64;

    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery<i64>>> {
        match &mut self.0 {
            #[cfg(feature = "sqlite")]
            SubscriberOf::Sqlite(s) => s.fetch(max, wait).await,
            #[cfg(feature = "postgres")]
            SubscriberOf::Postgres(s) => s.fetch(max, wait).await,
        }
    }

    async fn ack(&mut self, token: i64) -> Result<()> {
        match &mut self.0 {
            #[cfg(feature = "sqlite")]
            SubscriberOf::Sqlite(s) => s.ack(token).await,
            #[cfg(feature = "postgres")]
            SubscriberOf::Postgres(s) => s.ack(token).await,
        }
    }

    async fn ack_all(&mut self, tokens: Vec<i64>) -> Result<()> {
        match &mut self.0 {
            #[cfg(feature = "sqlite")]
            SubscriberOf::Sqlite(s) => s.ack_all(tokens).await,
            #[cfg(feature = "postgres")]
            SubscriberOf::Postgres(s) => s.ack_all(tokens).await,
        }
    }
}
