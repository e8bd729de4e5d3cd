//! # custody
//!
//! Keeps data consistent between services that each own their database:
//! a **transactional outbox** written in the service's own transaction, a
//! **relay** that moves committed messages to a transport (in order per key,
//! at least once, with retries, a circuit breaker and dead letters), and an
//! **idempotent inbox** that turns at-least-once delivery into an
//! exactly-once effect.
//!
//! Backends and transports are cargo features: `sqlite` (default),
//! `postgres`, `nats`. The backends compiled in form a registry by URL
//! scheme ([`drivers`]): [`open_admin`] opens any of them for the operations
//! port ([`Admin`]: dead letters, trace, checkpoints, reconcile history) and
//! [`run_relay`] runs the relay on any of them, so callers never match on a
//! backend. A new backend is one crate with a `DRIVER` and one line in each.
//!
//! ```
//! use custody::sqlite::{connect, migrate, SqliteEmbeddedSubscriber, SqliteInbox, SqliteOutbox};
//! use custody::{Consumer, ConsumerConfig, Handler, HandlerError, Message};
//!
//! // The billing service applies OrderPlaced to its ledger, inside the inbox transaction.
//! struct Billing;
//! impl Handler<sqlx::Transaction<'static, sqlx::Sqlite>> for Billing {
//!     async fn handle(
//!         &self,
//!         tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
//!         msg: &Message,
//!     ) -> Result<(), HandlerError> {
//!         let order: serde_json::Value = msg.decode_json()?;
//!         sqlx::query("INSERT INTO ledger (order_id) VALUES (?)")
//!             .bind(order["id"].as_i64())
//!             .execute(&mut **tx)
//!             .await
//!             .map_err(HandlerError::transient)?;
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! let dir = std::env::temp_dir().join(format!("custody-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let orders = connect(dir.join("orders.db").to_str().unwrap_or_default()).await?;
//! let billing = connect(dir.join("billing.db").to_str().unwrap_or_default()).await?;
//! migrate(&orders).await?;
//! migrate(&billing).await?;
//! sqlx::query("CREATE TABLE IF NOT EXISTS ledger (order_id INTEGER)").execute(&billing).await?;
//!
//! // Service A: the business change and its event commit together, or not at all.
//! let outbox = SqliteOutbox::new(orders.clone());
//! let mut tx = orders.begin().await?;
//! let msg = Message::builder("orders", "customer-7", "OrderPlaced")
//!     .json(&serde_json::json!({ "id": 1 }))?
//!     .build()?;
//! outbox.enqueue(&mut tx, &msg).await?;
//! tx.commit().await?;
//!
//! // Service B: read A's log (embedded transport, no broker), apply through the inbox.
//! let sub = SqliteEmbeddedSubscriber::new(orders.clone(), "billing", &["orders".to_owned()]).await?;
//! let mut consumer = Consumer::new(SqliteInbox::new(billing.clone()), sub, Billing, ConsumerConfig::new("billing"));
//! consumer.run_once().await?;
//! assert_eq!(consumer.stats().processed, 1);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub use custody_core::*;
pub use custody_engine::{
    live, metric_definitions, reconcile, repository, shutdown_token, CancellationToken, Consumer,
    ConsumerConfig, ConsumerStats, FencedInbox, LeaseConfig, LeasedConsumer, Relay, RelayConfig,
    RelayStats,
};

/// The backends compiled into this build (cargo features), in the order a
/// URL is matched against them: the registry behind [`open_admin`].
/// Adding a backend = one line here.
pub fn drivers() -> Vec<&'static Driver> {
    vec![
        #[cfg(feature = "postgres")]
        &custody_postgres::DRIVER,
        #[cfg(feature = "sqlite")]
        &custody_sqlite::DRIVER,
    ]
}

/// Open the custody database at `url` (any backend compiled in) for the
/// operations port. With [`Access::Existing`] nothing is created, migrated
/// or written by the opening; an unknown URL form is an error naming the
/// accepted ones.
pub async fn open_admin(url: &str, access: Access) -> Result<Box<dyn Admin>> {
    admin::open(&drivers(), url, access).await
}

/// Run a relay on the outbox at `url` (connected and migrated), whichever
/// backend compiled in holds it, publishing through `publisher` until
/// `cancel`. `id`: the relay's id in the lease table (default: random).
/// The relay is generic over the store, so each backend has one line here.
pub async fn run_relay<P: Publisher>(
    url: &str,
    publisher: P,
    config: RelayConfig,
    id: Option<String>,
    cancel: CancellationToken,
) -> Result<RelayStats> {
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    async fn go<S: OutboxStore, P: Publisher>(
        store: S,
        publisher: P,
        config: RelayConfig,
        id: Option<String>,
        cancel: CancellationToken,
    ) -> Result<RelayStats> {
        let mut relay = Relay::new(store, publisher, config);
        if let Some(id) = id {
            relay = relay.with_id(id);
        }
        relay.run(cancel).await
    }
    let driver = admin::driver_for(&drivers(), url)?;
    #[cfg(feature = "postgres")]
    if driver.name == custody_postgres::DRIVER.name {
        let pool = custody_postgres::connect(url).await?;
        // Migrate only when needed, so a relay role with only DML grants
        // runs on a migrated database (docs/SECURITY.md, roles).
        if custody_postgres::check_schema(&pool).await.is_err() {
            custody_postgres::migrate(&pool).await?;
        }
        return go(
            custody_postgres::PgOutbox::new(pool),
            publisher,
            config,
            id,
            cancel,
        )
        .await;
    }
    #[cfg(feature = "sqlite")]
    if driver.name == custody_sqlite::DRIVER.name {
        let pool = custody_sqlite::connect(url).await?;
        custody_sqlite::migrate(&pool).await?;
        return go(
            custody_sqlite::SqliteOutbox::new(pool),
            publisher,
            config,
            id,
            cancel,
        )
        .await;
    }
    let _ = (publisher, config, id, cancel);
    Err(Error::Config(format!(
        "backend {} has no relay in this build",
        driver.name
    )))
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod any;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use any::{open_embedded, open_outbox, AnyOutbox, EmbeddedSubscriber};

#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod events;
// documented by its own inner docs (an outer doc here would make rustdoc
// resolve their links in this scope)
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod log_relay;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use events::open_events;

#[cfg(all(feature = "declarative", any(feature = "sqlite", feature = "postgres")))]
mod consume;
#[cfg(all(feature = "declarative", any(feature = "sqlite", feature = "postgres")))]
pub use consume::{run_consumer, ConsumeLimits};

#[cfg(feature = "declarative")]
pub mod declarative;

pub mod projection;

/// SQLite backend: outbox, inbox, dead letters and the embedded transport.
#[cfg(feature = "sqlite")]
pub mod sqlite {
    pub use custody_sqlite::*;
}

/// PostgreSQL backend: outbox (with LISTEN/NOTIFY and partition leases),
/// inbox, dead letters and the embedded transport.
#[cfg(feature = "postgres")]
pub mod postgres {
    pub use custody_postgres::*;
}

/// NATS JetStream transport.
#[cfg(feature = "nats")]
pub mod nats {
    pub use custody_nats::*;
}
