//! The event log as outbox, by URL: run a log relay on the event store of
//! any backend compiled in ([`run_log_relay`]), reconcile a consumer against
//! it ([`open_event_history`]) and find an event by id ([`event_status`]),
//! with one line per backend here so the CLI never matches on a backend.
//! The engine is [`custody_engine::log_relay`] (re-exported here).

pub use custody_engine::log_relay::*;

use custody_core::event::{Direction, EventStore};
use custody_core::log_relay::LogRelayStore;
use custody_core::{admin, DynSentHistory, Error, MessageStatus, ProducerSide, Publisher, Result};
use custody_engine::{CancellationToken, RelayConfig, RelayStats};
use uuid::Uuid;

use crate::drivers;

/// Run the log relay `log` on the event store in the database at `url`
/// (connected and migrated), publishing through `publisher` until `cancel`.
/// `id`: this process's instance id (default: random); only one process per
/// [`LogRelayConfig::name`] publishes at a time, the others stand by.
pub async fn run_log_relay<P: Publisher>(
    url: &str,
    publisher: P,
    log: LogRelayConfig,
    config: RelayConfig,
    id: Option<String>,
    cancel: CancellationToken,
) -> Result<RelayStats> {
    async fn go<E: EventStore, S: LogRelayStore, P: Publisher>(
        events: E,
        state: S,
        publisher: P,
        log: LogRelayConfig,
        config: RelayConfig,
        id: Option<String>,
        cancel: CancellationToken,
    ) -> Result<RelayStats> {
        let mut relay = log_relay(events, state, publisher, log, config)?;
        if let Some(id) = id {
            relay = relay.with_id(id);
        }
        relay.run(cancel).await
    }
    let driver = admin::driver_for(&drivers(), url)?;
    #[cfg(feature = "postgres")]
    if driver.name == custody_postgres::DRIVER.name {
        let pool = custody_postgres::connect(url).await?;
        if custody_postgres::check_schema(&pool).await.is_err() {
            custody_postgres::migrate(&pool).await?;
        }
        let events = custody_postgres::PgEventStore::new(pool.clone());
        let state = custody_postgres::PgLogRelayStore::new(pool);
        return go(events, state, publisher, log, config, id, cancel).await;
    }
    #[cfg(feature = "sqlite")]
    if driver.name == custody_sqlite::DRIVER.name {
        let pool = custody_sqlite::connect(url).await?;
        custody_sqlite::migrate(&pool).await?;
        let events = custody_sqlite::SqliteEventStore::new(pool.clone());
        let state = custody_sqlite::SqliteLogRelayStore::new(pool);
        return go(events, state, publisher, log, config, id, cancel).await;
    }
    let _ = (publisher, log, config, id, cancel);
    Err(Error::Config(format!(
        "backend {} has no event store in this build",
        driver.name
    )))
}

/// The sent side of `custody reconcile` for the log relay `log` over the
/// event store at `url` ([`EventLogHistory`]), opened as it is: nothing is
/// created or migrated (docs/ARCHITECTURE.md invariant 8).
pub async fn open_event_history(url: &str, log: LogRelayConfig) -> Result<Box<dyn DynSentHistory>> {
    let driver = admin::driver_for(&drivers(), url)?;
    #[cfg(feature = "postgres")]
    if driver.name == custody_postgres::DRIVER.name {
        let pool = custody_postgres::open_existing(url).await?;
        return Ok(Box::new(EventLogHistory::new(
            custody_postgres::PgEventStore::new(pool.clone()),
            custody_postgres::PgLogRelayStore::new(pool),
            log,
        )?));
    }
    #[cfg(feature = "sqlite")]
    if driver.name == custody_sqlite::DRIVER.name {
        let pool = custody_sqlite::open_existing(url).await?;
        return Ok(Box::new(EventLogHistory::new(
            custody_sqlite::SqliteEventStore::new(pool.clone()),
            custody_sqlite::SqliteLogRelayStore::new(pool),
            log,
        )?));
    }
    let _ = log;
    Err(Error::Config(format!(
        "backend {} has no event store in this build",
        driver.name
    )))
}

/// Where the event `id` is, if the event store at `url` holds it: its
/// stream, version and position, and what log relays did with it (the
/// producer side of `custody trace`). `None`: no such event there.
pub async fn event_status(url: &str, id: Uuid) -> Result<Option<MessageStatus>> {
    async fn go<E: EventStore, S: LogRelayStore>(
        events: E,
        state: S,
        located: Option<(String, u64)>,
        id: Uuid,
    ) -> Result<Option<MessageStatus>> {
        let Some((stream, version)) = located else {
            return Ok(None);
        };
        let read = events
            .read_stream(&stream, Direction::Forward, version, 1)
            .await?;
        let Some(event) = read.events.into_iter().find(|e| e.id == id) else {
            // deleted or truncated since: its id is known, its content no longer readable
            return Ok(None);
        };
        let journal = state.entries_by_id(&[id]).await?;
        // the relay that got furthest with it speaks for it
        let entry = journal
            .into_iter()
            .map(|(_, e)| e)
            .max_by_key(|e| (e.status.settled(), e.published_at));
        let mut st = MessageStatus::new(id);
        st.producer = Some(ProducerSide {
            topic: entry
                .as_ref()
                .map_or_else(|| event.category().to_owned(), |e| e.topic.clone()),
            message_type: event.event_type.clone(),
            key: format!("{} (version {})", event.stream, event.version),
            position: i64::try_from(event.position).unwrap_or(i64::MAX),
            created_at: event.recorded_at,
            enqueued_at: event.recorded_at,
            status: entry
                .as_ref()
                .map_or("pending", |e| e.status.word())
                .to_owned(),
            attempts: entry.as_ref().map_or(0, |e| e.attempts),
            retry_at: entry.as_ref().and_then(|e| e.retry_at),
            last_error: entry.as_ref().and_then(|e| e.error.clone()),
            published_at: entry.as_ref().and_then(|e| e.published_at),
            publish_ref: entry.as_ref().and_then(|e| e.reference.clone()),
            republished: entry.as_ref().map_or(0, |e| e.republish),
            sequence: entry.as_ref().and_then(|e| e.sequence),
        });
        Ok(Some(st))
    }
    let driver = admin::driver_for(&drivers(), url)?;
    #[cfg(feature = "postgres")]
    if driver.name == custody_postgres::DRIVER.name {
        let pool = custody_postgres::open_existing(url).await?;
        let state = custody_postgres::PgLogRelayStore::new(pool.clone());
        let located = state.locate_event(id).await?;
        return go(
            custody_postgres::PgEventStore::new(pool),
            state,
            located,
            id,
        )
        .await;
    }
    #[cfg(feature = "sqlite")]
    if driver.name == custody_sqlite::DRIVER.name {
        let pool = custody_sqlite::open_existing(url).await?;
        let state = custody_sqlite::SqliteLogRelayStore::new(pool.clone());
        let located = state.locate_event(id).await?;
        return go(
            custody_sqlite::SqliteEventStore::new(pool),
            state,
            located,
            id,
        )
        .await;
    }
    let _ = id;
    Err(Error::Config(format!(
        "backend {} has no event store in this build",
        driver.name
    )))
}
