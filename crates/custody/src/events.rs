//! The event store of any backend compiled in, opened by URL
//! ([`open_events`]), with one line per backend here, so the `custody
//! events` commands (and any other caller holding a
//! `Box<dyn DynEventStore>`) never match on a backend.

use custody_core::event::DynEventStore;
use custody_core::{admin, Access, Error, Result};

use crate::drivers;

/// Open the event store in the custody database at `url`, whichever backend
/// compiled in accepts it.
///
/// - With [`Access::Existing`] the database is opened as it is (`custody events
///   read|tail|streams`): never created or migrated; a missing SQLite file,
///   a database without custody's tables or with an older schema is an
///   error naming it (docs/ARCHITECTURE.md invariant 8).
/// - With [`Access::Migrate`] it is connected (a SQLite file is created if missing)
///   and migrated, as [`crate::open_outbox`] does for `custody produce`
///   (`custody events append`).
///
/// A URL no backend accepts is the registry's error naming the accepted
/// forms.
pub async fn open_events(url: &str, access: Access) -> Result<Box<dyn DynEventStore>> {
    let driver = admin::driver_for(&drivers(), url)?;
    #[cfg(feature = "postgres")]
    if driver.name == custody_postgres::DRIVER.name {
        let pool = match access {
            Access::Existing => custody_postgres::open_existing(url).await?,
            Access::Migrate => {
                let pool = custody_postgres::connect(url).await?;
                custody_postgres::migrate(&pool).await?;
                pool
            }
        };
        return Ok(Box::new(custody_postgres::PgEventStore::new(pool)));
    }
    #[cfg(feature = "sqlite")]
    if driver.name == custody_sqlite::DRIVER.name {
        let pool = match access {
            Access::Existing => custody_sqlite::open_existing(url).await?,
            Access::Migrate => {
                let pool = custody_sqlite::connect(url).await?;
                custody_sqlite::migrate(&pool).await?;
                pool
            }
        };
        return Ok(Box::new(custody_sqlite::SqliteEventStore::new(pool)));
    }
    let _ = access;
    Err(Error::Config(format!(
        "backend {} has no event store in this build",
        driver.name
    )))
}
