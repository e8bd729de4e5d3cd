//! CQRS projections (docs/PROJECTIONS.md): the runner and the trait from
//! `custody-engine`, the read-model port from `custody-core`, and the
//! operator's port on any backend compiled in, opened by URL
//! ([`open_projection_admin`], one line per backend) for `custody
//! projection`.

use custody_core::{admin, Error, Result};

pub use custody_core::projection::{
    Generation, ProjectionAdmin, ProjectionDeadLetter, ProjectionStatus, ProjectionStore, Request,
    Tables,
};
pub use custody_engine::projection::{
    Projection, ProjectionConfig, ProjectionRunner, RunnerStatus,
};
pub use custody_engine::subscription::{Page, Subscription, SubscriptionConfig};

use crate::drivers;

/// The operator's port on the read-model database at `url` (any backend
/// compiled in), opened as it is: it must exist and hold custody's tables
/// (a mistyped path is an error, not a new empty database).
pub async fn open_projection_admin(url: &str) -> Result<Box<dyn ProjectionAdmin>> {
    let driver = admin::driver_for(&drivers(), url)?;
    #[cfg(feature = "postgres")]
    if driver.name == custody_postgres::DRIVER.name {
        let pool = custody_postgres::open_existing(url).await?;
        return Ok(Box::new(custody_postgres::PgProjectionAdmin::new(pool)));
    }
    #[cfg(feature = "sqlite")]
    if driver.name == custody_sqlite::DRIVER.name {
        let pool = custody_sqlite::open_existing(url).await?;
        return Ok(Box::new(custody_sqlite::SqliteProjectionAdmin::new(pool)));
    }
    let _ = url;
    Err(Error::Config(format!(
        "backend {} has no projections in this build",
        driver.name
    )))
}
