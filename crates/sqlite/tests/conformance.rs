//! The conformance suites (custody_testkit::conformance) on SQLite: the
//! stores on a fresh database file, the embedded transport on its outbox.

use std::time::Duration;

use custody_core::{DeadLetter, Message, Subscriber};
use custody_sqlite::{SqliteEmbeddedSubscriber, SqliteInbox, SqliteOutbox, SqliteSettings};
use custody_testkit::conformance::{Scenario, StoreFixture, TransportFixture};
use sqlx::{Connection, SqliteConnection, SqlitePool};
use tempfile::TempDir;

/// A fresh database file; an outage is another connection holding the
/// write lock (`BEGIN EXCLUSIVE`), so writes fail busy after a busy
/// timeout of 3 s: short enough for the outage scenario, long enough that
/// concurrent producers on a loaded machine wait for each other instead of
/// failing busy (300 ms did fail `per_key_order_under_concurrency_test`).
struct Sqlite {
    dir: TempDir,
    pool: SqlitePool,
    outbox: SqliteOutbox,
    inbox: SqliteInbox,
    locker: tokio::sync::Mutex<Option<SqliteConnection>>,
}

impl Sqlite {
    fn path(&self) -> String {
        self.dir
            .path()
            .join("custody.db")
            .to_string_lossy()
            .into_owned()
    }

    async fn create() -> anyhow::Result<Sqlite> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("custody.db").to_string_lossy().into_owned();
        let settings = SqliteSettings {
            busy_timeout: Duration::from_secs(3),
            ..SqliteSettings::default()
        };
        let pool = custody_sqlite::connect_with(&path, settings).await?;
        custody_sqlite::migrate(&pool).await?;
        Ok(Sqlite {
            outbox: SqliteOutbox::new(pool.clone()),
            inbox: SqliteInbox::new(pool.clone()),
            pool,
            dir,
            locker: tokio::sync::Mutex::new(None),
        })
    }
}

impl StoreFixture for Sqlite {
    type Outbox = SqliteOutbox;
    type Inbox = SqliteInbox;

    async fn fresh() -> anyhow::Result<Option<Self>> {
        Ok(Some(Sqlite::create().await?))
    }

    fn not_applicable(&self, _scenario: Scenario) -> Option<&'static str> {
        None
    }

    fn outbox(&self) -> SqliteOutbox {
        self.outbox.clone()
    }

    fn inbox(&self) -> SqliteInbox {
        self.inbox.clone()
    }

    async fn enqueue(&self, messages: &[Message], commit: bool) -> anyhow::Result<Vec<i64>> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        for m in messages {
            out.push(self.outbox.enqueue(&mut tx, m).await?);
        }
        if commit {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(out)
    }

    async fn outbox_positions(&self) -> anyhow::Result<Vec<i64>> {
        Ok(
            sqlx::query_scalar("SELECT position FROM custody_outbox ORDER BY position")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn outbox_dead_letters(&self) -> anyhow::Result<usize> {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM custody_dead_letter WHERE origin = 'relay'")
                .fetch_one(&self.pool)
                .await?;
        Ok(usize::try_from(n)?)
    }

    async fn set_store_down(&self, down: bool) -> anyhow::Result<()> {
        let mut locker = self.locker.lock().await;
        if down {
            let mut conn = SqliteConnection::connect(&format!("sqlite://{}", self.path())).await?;
            sqlx::query("BEGIN EXCLUSIVE").execute(&mut conn).await?;
            *locker = Some(conn);
        } else if let Some(mut conn) = locker.take() {
            sqlx::query("ROLLBACK").execute(&mut conn).await?;
            conn.close().await?;
        }
        Ok(())
    }

    async fn settle(&self) -> anyhow::Result<()> {
        // a committed row is visible to the embedded reader at once
        Ok(())
    }

    async fn read_and_ack(&self, reader: &str, max: usize) -> anyhow::Result<Vec<i64>> {
        let mut sub = SqliteEmbeddedSubscriber::new(self.pool.clone(), reader, &[]).await?;
        let got = sub.fetch(max, Duration::from_secs(1)).await?;
        let positions: Vec<i64> = got.iter().map(|d| d.token).collect();
        for d in got {
            sub.ack(d.token).await?;
        }
        Ok(positions)
    }

    async fn set_checkpoint(&self, reader: &str, position: i64) -> anyhow::Result<()> {
        Ok(custody_sqlite::set_checkpoint(&self.pool, reader, position).await?)
    }

    async fn redrive(&self, id: uuid::Uuid) -> anyhow::Result<()> {
        let seqs: Vec<i64> =
            sqlx::query_scalar("SELECT seq FROM custody_dead_letter WHERE message_id = ?1")
                .bind(id.hyphenated().to_string())
                .fetch_all(&self.pool)
                .await?;
        let out = custody_sqlite::redrive(&self.pool, &seqs, chrono::Utc::now()).await?;
        anyhow::ensure!(out.to_consumer == 1, "redrive: {out:?}");
        Ok(())
    }

    async fn inbox_dead_letters(&self) -> anyhow::Result<Vec<DeadLetter>> {
        Ok(custody_sqlite::dead_letters(&self.pool).await?)
    }
}

custody_testkit::store_conformance!(Sqlite);

/// The embedded transport: messages sent are committed outbox rows.
struct Embedded(Sqlite);

impl TransportFixture for Embedded {
    type Subscriber = SqliteEmbeddedSubscriber;

    async fn fresh() -> anyhow::Result<Option<Self>> {
        Ok(Some(Embedded(Sqlite::create().await?)))
    }

    fn topic(&self) -> String {
        "orders".into()
    }

    async fn send(&self, messages: &[Message]) -> anyhow::Result<()> {
        self.0.enqueue(messages, true).await?;
        Ok(())
    }

    async fn subscriber(&self, name: &str) -> anyhow::Result<SqliteEmbeddedSubscriber> {
        Ok(
            SqliteEmbeddedSubscriber::new(self.0.pool.clone(), name, &[self.topic()])
                .await?
                .with_poll_interval(Duration::from_millis(10))
                .with_outbox(&self.0.outbox),
        )
    }
}

custody_testkit::transport_conformance!(Embedded);
