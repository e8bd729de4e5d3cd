//! The relay engine on a real SQLite outbox with a test transport: a failing
//! message parks only its own key, a transport outage dead-letters nothing,
//! and history is pruned after its retention.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use common::step_message;
use custody_core::{Error, ManualClock, Message, PublishAck, Publisher};
use custody_engine::{Relay, RelayConfig};
use custody_sqlite::SqliteOutbox;
use sqlx::SqlitePool;

/// A transport that records what it accepted; messages in `poison` fail, and
/// everything fails while `down` is set. Failures are retryable, like a
/// broker timeout.
#[derive(Clone, Default)]
struct TestTransport {
    accepted: Arc<Mutex<Vec<Message>>>,
    poison: Arc<Mutex<HashSet<uuid::Uuid>>>,
    down: Arc<Mutex<bool>>,
}

impl Publisher for TestTransport {
    async fn publish(&self, message: &Message) -> custody_core::Result<PublishAck> {
        let down = *self.down.lock().expect("lock");
        if down || self.poison.lock().expect("lock").contains(&message.id) {
            return Err(Error::transport(
                "test",
                "publish",
                true,
                "simulated timeout",
            ));
        }
        self.accepted.lock().expect("lock").push(message.clone());
        Ok(PublishAck::default())
    }
}

async fn outbox() -> anyhow::Result<(tempfile::TempDir, SqlitePool, SqliteOutbox)> {
    let dir = tempfile::tempdir()?;
    let pool =
        custody_sqlite::connect(dir.path().join("a.db").to_str().unwrap_or_default()).await?;
    custody_sqlite::migrate(&pool).await?;
    Ok((dir, pool.clone(), SqliteOutbox::new(pool)))
}

async fn enqueue(pool: &SqlitePool, outbox: &SqliteOutbox, msgs: &[Message]) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    outbox.enqueue_batch(&mut tx, msgs).await?;
    tx.commit().await?;
    Ok(())
}

async fn count(pool: &SqlitePool, sql: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

fn config() -> RelayConfig {
    let mut c = RelayConfig {
        max_attempts: 3,
        ..RelayConfig::default()
    };
    c.breaker.failure_threshold = 2;
    c.breaker.open_for = Duration::from_secs(1);
    c
}

#[tokio::test]
async fn a_failing_message_parks_only_its_own_key_then_is_dead_lettered() -> anyhow::Result<()> {
    let (_d, pool, outbox) = outbox().await?;
    let transport = TestTransport::default();
    let clock = ManualClock::new(Utc::now());
    let mut relay = Relay::new(outbox.clone(), transport.clone(), config())
        .with_clock(clock.clone())
        .with_seed(7);
    let bad1 = step_message("steps", "bad", 1);
    transport.poison.lock().expect("lock").insert(bad1.id);
    enqueue(
        &pool,
        &outbox,
        &[
            bad1.clone(),
            step_message("steps", "good", 1),
            step_message("steps", "bad", 2),
            step_message("steps", "good", 2),
        ],
    )
    .await?;

    relay.step().await?;
    let accepted: Vec<(String, i64)> = transport
        .accepted
        .lock()
        .expect("lock")
        .iter()
        .map(|m| {
            (
                m.key.clone(),
                m.decode_json::<common::Step>().map(|s| s.seq).unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(
        accepted,
        vec![("good".to_owned(), 1), ("good".to_owned(), 2)],
        "the other key flows"
    );
    // bad#1 is parked; bad#2 waits behind it (order per key)
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM custody_outbox WHERE status = 0"
        )
        .await?,
        2
    );
    assert_eq!(
        count(
            &pool,
            "SELECT attempts FROM custody_outbox WHERE msg_key = 'bad' ORDER BY position LIMIT 1"
        )
        .await?,
        1
    );

    // more traffic on the good key keeps flowing while bad retries with backoff
    for round in 0..6 {
        enqueue(&pool, &outbox, &[step_message("steps", "good", 3 + round)]).await?;
        clock.advance(Duration::from_secs(60));
        relay.step().await?;
    }
    let dead = count(
        &pool,
        "SELECT COUNT(*) FROM custody_outbox WHERE status = 2",
    )
    .await?;
    assert_eq!(dead, 1, "bad#1 dead-lettered after max_attempts");
    let reason: String = sqlx::query_scalar("SELECT error FROM custody_dead_letter")
        .fetch_one(&pool)
        .await?;
    assert!(
        reason.contains("failed 3 times") && reason.contains("simulated timeout"),
        "{reason}"
    );
    // the key flows again once its head is dead-lettered
    clock.advance(Duration::from_secs(60));
    while relay.step().await? > 0 {}
    let accepted = transport.accepted.lock().expect("lock").clone();
    let bad: Vec<i64> = accepted
        .iter()
        .filter(|m| m.key == "bad" && !custody_core::sequence::is_skip_marker(m))
        .map(|m| m.decode_json::<common::Step>().map(|s| s.seq).unwrap_or(-1))
        .collect();
    assert_eq!(bad, vec![2]);
    // bad#1's number is accounted for by the skip marker published in its place
    let markers: Vec<_> = accepted
        .iter()
        .filter(|m| custody_core::sequence::is_skip_marker(m))
        .collect();
    assert_eq!(markers.len(), 1, "{markers:?}");
    assert_eq!(markers[0].key, "bad");
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM custody_outbox WHERE status = 0"
        )
        .await?,
        0
    );
    Ok(())
}

#[tokio::test]
async fn a_transport_outage_dead_letters_nothing_and_the_backlog_drains_in_order(
) -> anyhow::Result<()> {
    let (_d, pool, outbox) = outbox().await?;
    let transport = TestTransport::default();
    *transport.down.lock().expect("lock") = true;
    let clock = ManualClock::new(Utc::now());
    let mut relay =
        Relay::new(outbox.clone(), transport.clone(), config()).with_clock(clock.clone());
    let msgs: Vec<Message> = (1..=30)
        .map(|i| step_message("steps", &format!("k{}", i % 3), i))
        .collect();
    enqueue(&pool, &outbox, &msgs).await?;
    for _ in 0..20 {
        relay.step().await?;
        clock.advance(Duration::from_secs(5));
    }
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM custody_outbox WHERE status = 2"
        )
        .await?,
        0
    );
    assert_eq!(
        count(
            &pool,
            "SELECT COALESCE(MAX(attempts), 0) FROM custody_outbox"
        )
        .await?,
        0,
        "an outage is not the messages' fault"
    );
    *transport.down.lock().expect("lock") = false;
    clock.advance(Duration::from_secs(5));
    while relay.step().await? > 0 {}
    let got: Vec<_> = transport
        .accepted
        .lock()
        .expect("lock")
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(got.len(), 30);
    for k in 0..3 {
        let key = format!("k{k}");
        let order: Vec<_> = transport
            .accepted
            .lock()
            .expect("lock")
            .iter()
            .filter(|m| m.key == key)
            .map(|m| m.id)
            .collect();
        let want: Vec<_> = msgs.iter().filter(|m| m.key == key).map(|m| m.id).collect();
        assert_eq!(order, want, "order of {key}");
    }
    Ok(())
}

#[tokio::test]
async fn published_history_is_pruned_after_its_retention() -> anyhow::Result<()> {
    let (_d, pool, outbox) = outbox().await?;
    let transport = TestTransport::default();
    let clock = ManualClock::new(Utc::now());
    let cfg = RelayConfig {
        retention: Duration::from_secs(3600),
        prune_interval: Duration::from_secs(1),
        ..config()
    };
    let mut relay = Relay::new(outbox.clone(), transport, cfg).with_clock(clock.clone());
    let msgs: Vec<Message> = (1..=25).map(|i| step_message("steps", "k", i)).collect();
    enqueue(&pool, &outbox, &msgs).await?;
    while relay.step().await? > 0 {}
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM custody_outbox WHERE status = 1"
        )
        .await?,
        25
    );
    // inside the retention window: kept
    clock.advance(Duration::from_secs(1800));
    relay.step().await?;
    assert_eq!(
        count(&pool, "SELECT COUNT(*) FROM custody_outbox").await?,
        25
    );
    // a pending message is never pruned, however old
    enqueue(&pool, &outbox, &[step_message("other", "k2", 1)]).await?;
    sqlx::query("UPDATE custody_outbox SET retry_at = 1 WHERE topic = 'other'")
        .execute(&pool)
        .await?;
    clock.advance(Duration::from_secs(7200));
    relay.step().await?;
    assert_eq!(relay.stats().pruned, 25);
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM custody_outbox WHERE status = 1"
        )
        .await?,
        1,
        "only the newly published one remains"
    );
    Ok(())
}
