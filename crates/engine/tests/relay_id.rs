//! Issue 11, "Also": two relay processes started with one `--id` on one
//! PostgreSQL outbox. Each `PgOutbox` plays a process (its own instance
//! token); the second relay is refused with an error naming the id, first
//! retryably (the holder may have crashed), then for good once the holder's
//! heartbeat moved (it is alive). A crashed holder frees the id after the ttl.
#![allow(missing_docs)]

use std::time::Duration;

use chrono::Utc;
use custody_core::{Error, ManualClock, Message};
use custody_engine::{Relay, RelayConfig};
use custody_postgres::PgOutbox;
use custody_testkit::memory::MemoryBroker;

#[tokio::test]
async fn a_second_live_relay_with_the_same_id_is_refused() -> anyhow::Result<()> {
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let pool = custody_postgres::connect(&db.url).await?;
    custody_postgres::migrate(&pool).await?;
    let broker = MemoryBroker::default();
    let config = RelayConfig {
        lease_ttl: Duration::from_secs(9),
        ..RelayConfig::default()
    };
    let clock = ManualClock::new(Utc::now());
    let process = |token: &str| PgOutbox::new(pool.clone()).with_instance(token);
    let mut first = Relay::new(process("process-1"), broker.clone(), config.clone())
        .with_clock(clock.clone())
        .with_id("billing-relay");
    let mut second = Relay::new(process("process-2"), broker.clone(), config.clone())
        .with_clock(clock.clone())
        .with_id("billing-relay");

    let outbox = process("producer");
    let mut tx = pool.begin().await?;
    outbox
        .enqueue(&mut tx, &Message::builder("orders", "k", "T").build()?)
        .await?;
    tx.commit().await?;

    assert_eq!(first.step().await?, 1, "the first relay publishes");
    let refused = second.step().await.err();
    assert!(
        matches!(&refused, Some(Error::RelayIdInUse { live: false, .. })),
        "{refused:?}"
    );
    assert!(refused.as_ref().is_some_and(Error::retryable));
    // the first renews its heartbeat (a third of the ttl later): it is alive
    clock.advance(Duration::from_secs(4));
    first.step().await?;
    let refused = second.step().await.err();
    let Some(e @ Error::RelayIdInUse { live: true, .. }) = refused else {
        panic!("expected a terminal RelayIdInUse, got {refused:?}");
    };
    assert!(!e.retryable(), "run() returns it");
    let text = e.to_string();
    assert!(
        text.contains("\"billing-relay\"") && text.contains("--id"),
        "the error names the id and what to do: {text}"
    );
    assert_eq!(broker.stored().len(), 1, "published once");

    // the first process dies: after the ttl a new one gets the id
    clock.advance(Duration::from_secs(10));
    let mut third = Relay::new(process("process-3"), broker.clone(), config)
        .with_clock(clock.clone())
        .with_id("billing-relay");
    third.step().await?;
    assert_eq!(third.partitions().len(), 16);
    Ok(())
}
