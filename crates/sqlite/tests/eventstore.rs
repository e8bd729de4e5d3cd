//! The event store on SQLite: the conformance suite
//! (custody_testkit::conformance::eventstore) on a fresh database file, and
//! what only SQLite has (append_in joining the caller's transaction, write
//! combining).

use custody_sqlite::SqliteEventStore;
use custody_testkit::conformance::eventstore::EventStoreFixture;
use sqlx::SqlitePool;
use tempfile::TempDir;

/// A fresh custody database file with an event store on it.
struct SqliteFixture {
    _dir: TempDir,
    #[allow(dead_code)]
    pool: SqlitePool,
    store: SqliteEventStore,
}

impl SqliteFixture {
    async fn create() -> anyhow::Result<SqliteFixture> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("custody.db").to_string_lossy().into_owned();
        let pool = custody_sqlite::connect(&path).await?;
        custody_sqlite::migrate(&pool).await?;
        Ok(SqliteFixture {
            store: SqliteEventStore::new(pool.clone()),
            pool,
            _dir: dir,
        })
    }
}

impl EventStoreFixture for SqliteFixture {
    type Store = SqliteEventStore;

    async fn fresh() -> anyhow::Result<Option<Self>> {
        Ok(Some(SqliteFixture::create().await?))
    }

    fn store(&self) -> SqliteEventStore {
        self.store.clone()
    }
}

custody_testkit::eventstore_conformance!(SqliteFixture);

/// The same suite with write combining off: every append its own transaction.
struct Uncombined(SqliteFixture);

impl EventStoreFixture for Uncombined {
    type Store = SqliteEventStore;

    async fn fresh() -> anyhow::Result<Option<Self>> {
        let mut f = SqliteFixture::create().await?;
        f.store = f.store.with_write_combining(false);
        Ok(Some(Uncombined(f)))
    }

    fn store(&self) -> SqliteEventStore {
        self.0.store.clone()
    }
}

mod uncombined {
    use super::Uncombined;
    custody_testkit::eventstore_conformance!(Uncombined);
}
