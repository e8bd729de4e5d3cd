//! The conformance suites (custody_testkit::conformance) on PostgreSQL: the
//! stores on a fresh database reached through a fault proxy (an outage is
//! a cut connection), the embedded transport on its outbox.
#![allow(missing_docs)]

mod common;

use std::time::Duration;

use custody_core::{DeadLetter, Message, Subscriber};
use custody_postgres::{PgEmbeddedSubscriber, PgInbox, PgOutbox};
use custody_testkit::conformance::{Scenario, StoreFixture, TransportFixture};
use custody_testkit::{FaultProxy, PgTestDb};
use sqlx::PgPool;

struct Postgres {
    _db: PgTestDb,
    proxy: FaultProxy,
    pool: PgPool,
    outbox: PgOutbox,
    inbox: PgInbox,
}

impl Postgres {
    async fn create() -> anyhow::Result<Option<Postgres>> {
        let Some(db) = custody_testkit::postgres_db().await? else {
            return Ok(None);
        };
        let (proxy, url) = FaultProxy::for_url(&db.url).await?;
        let pool = custody_postgres::connect(&url).await?;
        custody_postgres::migrate(&pool).await?;
        Ok(Some(Postgres {
            _db: db,
            proxy,
            outbox: PgOutbox::new(pool.clone()),
            inbox: PgInbox::new(pool.clone()),
            pool,
        }))
    }
}

impl StoreFixture for Postgres {
    type Outbox = PgOutbox;
    type Inbox = PgInbox;

    async fn fresh() -> anyhow::Result<Option<Self>> {
        Postgres::create().await
    }

    fn not_applicable(&self, _scenario: Scenario) -> Option<&'static str> {
        None
    }

    fn outbox(&self) -> PgOutbox {
        self.outbox.clone()
    }

    fn inbox(&self) -> PgInbox {
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
        if down {
            self.proxy.cut();
        } else {
            self.proxy.restore();
        }
        Ok(())
    }

    async fn settle(&self) -> anyhow::Result<()> {
        common::settle(&self.pool).await
    }

    async fn read_and_ack(&self, reader: &str, max: usize) -> anyhow::Result<Vec<i64>> {
        let mut sub = PgEmbeddedSubscriber::new(self.pool.clone(), reader, &[]).await?;
        let got = sub.fetch(max, Duration::from_secs(1)).await?;
        let positions: Vec<i64> = got.iter().map(|d| d.token).collect();
        for d in got {
            sub.ack(d.token).await?;
        }
        Ok(positions)
    }

    async fn set_checkpoint(&self, reader: &str, position: i64) -> anyhow::Result<()> {
        Ok(custody_postgres::set_checkpoint(&self.pool, reader, position).await?)
    }

    async fn redrive(&self, id: uuid::Uuid) -> anyhow::Result<()> {
        let seqs: Vec<i64> =
            sqlx::query_scalar("SELECT seq FROM custody_dead_letter WHERE message_id = $1")
                .bind(id)
                .fetch_all(&self.pool)
                .await?;
        let out = custody_postgres::redrive(&self.pool, &seqs, chrono::Utc::now()).await?;
        anyhow::ensure!(out.to_consumer == 1, "redrive: {out:?}");
        Ok(())
    }

    async fn inbox_dead_letters(&self) -> anyhow::Result<Vec<DeadLetter>> {
        Ok(custody_postgres::dead_letters(&self.pool).await?)
    }
}

custody_testkit::store_conformance!(Postgres);

/// The embedded transport: messages sent are committed outbox rows.
struct Embedded(Postgres);

impl TransportFixture for Embedded {
    type Subscriber = PgEmbeddedSubscriber;

    async fn fresh() -> anyhow::Result<Option<Self>> {
        Ok(Postgres::create().await?.map(Embedded))
    }

    fn topic(&self) -> String {
        "orders".into()
    }

    async fn send(&self, messages: &[Message]) -> anyhow::Result<()> {
        self.0.enqueue(messages, true).await?;
        Ok(())
    }

    async fn subscriber(&self, name: &str) -> anyhow::Result<PgEmbeddedSubscriber> {
        Ok(PgEmbeddedSubscriber::new(self.0.pool.clone(), name, &[self.topic()]).await?)
    }
}

custody_testkit::transport_conformance!(Embedded);
