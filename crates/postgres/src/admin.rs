//! The operations port ([`custody_core::Admin`]) over a PostgreSQL
//! database, the driver that opens one by URL, and the dead-letter listing
//! (the impl is custody-sql's [`custody_sql::admin_impl!`]).

use custody_core::admin::Driver;
use sqlx::PgPool;

use crate::{PgInbox, PgOutbox};

/// The PostgreSQL entry of the backend registry: `postgres://…` and
/// `postgresql://…` URLs.
pub const DRIVER: Driver = Driver {
    name: "postgres",
    forms: &[
        "postgres://user:password@host:port/database",
        "postgresql://…",
    ],
    accepts,
    open,
    migrate: migrate_url,
};

pub(crate) fn accepts(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

custody_sql::admin_impl! {
    /// [`custody_core::Admin`] over one PostgreSQL database.
    pub struct PgAdmin;
    pool: PgPool,
    outbox: PgOutbox,
    inbox: PgInbox,
    driver: DRIVER,
}
