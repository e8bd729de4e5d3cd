//! Reconciliation (balancing controls) against real databases, with real
//! gaps: inbox rows deleted after processing, a message dead-lettered on
//! purpose, an inbox row for a message the producer never sent. Repair
//! through the embedded transport (checkpoint rewind) and through the relay
//! + NATS (republish past JetStream's duplicate window).

mod common;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::{step_message, Recorder, EFFECTS_SQLITE};
use custody_core::{Message, ReconcileQuery, ReconcileReport, SentHistory, CONTENT_TYPE_JSON};
use custody_engine::reconcile::{reconcile, Progress};
use custody_engine::{CancellationToken, Consumer, ConsumerConfig, Relay, RelayConfig};
use custody_sqlite::{SqliteEmbeddedSubscriber, SqliteInbox, SqliteOutbox};
use sqlx::SqlitePool;
use uuid::Uuid;

fn query(from: DateTime<Utc>, to: DateTime<Utc>) -> ReconcileQuery {
    ReconcileQuery {
        topic: "steps".into(),
        consumer: "billing".into(),
        from,
        to,
        window: Duration::from_secs(3600),
    }
}

fn no_progress(_: Progress) {}

fn sorted(mut v: Vec<Uuid>) -> Vec<Uuid> {
    v.sort();
    v
}

async fn sqlite(dir: &tempfile::TempDir, name: &str) -> anyhow::Result<SqlitePool> {
    let pool = custody_sqlite::connect(dir.path().join(name).to_str().unwrap_or_default()).await?;
    custody_sqlite::migrate(&pool).await?;
    Ok(pool)
}

async fn enqueue(outbox: &SqliteOutbox, msgs: &[Message]) -> anyhow::Result<()> {
    let mut tx = outbox.pool().begin().await?;
    outbox.enqueue_batch(&mut tx, msgs).await?;
    tx.commit().await?;
    Ok(())
}

/// Delete the inbox rows (and effects) of `ids` from B: deliveries lost.
async fn lose_sqlite(b: &SqlitePool, ids: &[Uuid]) -> anyhow::Result<()> {
    for id in ids {
        let n =
            sqlx::query("DELETE FROM custody_inbox WHERE consumer = 'billing' AND message_id = ?")
                .bind(id.to_string())
                .execute(b)
                .await?
                .rows_affected();
        anyhow::ensure!(n == 1, "inbox row of {id} was not there to delete");
        sqlx::query("DELETE FROM effects WHERE message_id = ?")
            .bind(id.to_string())
            .execute(b)
            .await?;
    }
    Ok(())
}

async fn embedded_consumer(
    a: &SqlitePool,
    b: &SqlitePool,
) -> anyhow::Result<Consumer<SqliteInbox, SqliteEmbeddedSubscriber, Recorder>> {
    let sub = SqliteEmbeddedSubscriber::new(a.clone(), "billing", &["steps".to_owned()])
        .await?
        .with_poll_interval(Duration::from_millis(10));
    let mut cfg = ConsumerConfig::new("billing");
    cfg.fetch_wait = Duration::from_millis(20);
    cfg.batch_size = 200;
    Ok(Consumer::new(
        SqliteInbox::new(b.clone()),
        sub,
        Recorder::default(),
        cfg,
    ))
}

async fn drain<I, S, H>(c: &mut Consumer<I, S, H>) -> anyhow::Result<()>
where
    I: custody_core::InboxStore,
    S: custody_core::Subscriber,
    H: custody_core::Handler<I::Tx>,
{
    while c.run_once().await? > 0 {}
    Ok(())
}

fn bad_message() -> anyhow::Result<Message> {
    Ok(Message::builder("steps", "k-bad", "NobodyHandlesThis")
        .payload(CONTENT_TYPE_JSON, b"{}".to_vec())
        .build()?)
}

#[tokio::test]
async fn embedded_sqlite_missing_ids_are_reported_exactly_and_repaired() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = sqlite(&dir, "a.db").await?;
    let b = sqlite(&dir, "b.db").await?;
    sqlx::query(EFFECTS_SQLITE).execute(&b).await?;
    let outbox = SqliteOutbox::new(a.clone());
    let from = Utc::now() - chrono::Duration::hours(1);

    let mut msgs: Vec<Message> = (0..300)
        .map(|i| step_message("steps", &format!("k{}", i % 10), i64::from(i / 10 + 1)))
        .collect();
    let dead = bad_message()?;
    msgs.push(dead.clone());
    enqueue(&outbox, &msgs).await?;
    // another topic: never counted
    enqueue(&outbox, &[step_message("other", "k", 1)]).await?;

    let mut c = embedded_consumer(&a, &b).await?;
    drain(&mut c).await?;
    assert_eq!(c.stats().processed, 300);
    assert_eq!(c.stats().dead_lettered, 1);
    drop(c);

    let to = Utc::now() + chrono::Duration::minutes(1);
    let clean = reconcile(
        &outbox,
        &SqliteInbox::new(b.clone()),
        &query(from, to),
        &no_progress,
    )
    .await?;
    assert!(clean.is_clean(), "{clean:#?}");
    assert_eq!(clean.sent, 301);
    assert_eq!(clean.processed, 301);
    assert_eq!(clean.mismatching, 0);
    assert!(clean.windows_checked >= 1);
    // the dead-lettered message is accounted for, not missing
    assert_eq!(clean.dead_lettered.len(), 1);
    assert_eq!(clean.dead_lettered[0].id, dead.id);
    assert_eq!(clean.dead_lettered[0].side, "consumer");

    // lose a known set of deliveries
    let lost: Vec<Uuid> = sorted(msgs.iter().step_by(37).take(7).map(|m| m.id).collect());
    lose_sqlite(&b, &lost).await?;
    let report = reconcile(
        &outbox,
        &SqliteInbox::new(b.clone()),
        &query(from, to),
        &no_progress,
    )
    .await?;
    assert_eq!(report.missing, lost, "{report:#?}");
    assert!(report.unexpected.is_empty());
    assert_eq!(report.sent - report.processed, 7);
    assert!(report.mismatching >= 1);

    // repair (embedded transport): rewind the subscription, run the consumer again
    let rewound = custody_sqlite::rewind_checkpoint(&a, "billing", &report.missing).await?;
    assert!(rewound.is_some());
    let mut c = embedded_consumer(&a, &b).await?;
    drain(&mut c).await?;
    assert_eq!(
        c.stats().processed,
        7,
        "only the lost ones are applied again"
    );
    let again = reconcile(
        &outbox,
        &SqliteInbox::new(b.clone()),
        &query(from, to),
        &no_progress,
    )
    .await?;
    assert!(again.is_clean(), "{again:#?}");
    let effects: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM effects")
        .fetch_one(&b)
        .await?;
    let distinct: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT message_id) FROM effects")
        .fetch_one(&b)
        .await?;
    assert_eq!((effects, distinct), (300, 300));
    Ok(())
}

#[tokio::test]
async fn processed_but_never_sent_is_unexpected() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = sqlite(&dir, "a.db").await?;
    let b = sqlite(&dir, "b.db").await?;
    sqlx::query(EFFECTS_SQLITE).execute(&b).await?;
    let outbox = SqliteOutbox::new(a.clone());
    let from = Utc::now() - chrono::Duration::hours(1);
    let msgs: Vec<Message> = (0..50).map(|i| step_message("steps", "k", i + 1)).collect();
    enqueue(&outbox, &msgs).await?;
    let mut c = embedded_consumer(&a, &b).await?;
    drain(&mut c).await?;

    let stranger = Uuid::now_v7();
    sqlx::query("INSERT INTO custody_inbox (consumer, message_id, topic, processed_at) VALUES ('billing', ?, 'steps', 0)")
        .bind(stranger.to_string())
        .execute(&b)
        .await?;
    let to = Utc::now() + chrono::Duration::minutes(1);
    let r = reconcile(
        &outbox,
        &SqliteInbox::new(b.clone()),
        &query(from, to),
        &no_progress,
    )
    .await?;
    assert_eq!(r.unexpected, vec![stranger]);
    assert!(r.missing.is_empty());
    assert!(!r.is_clean());
    Ok(())
}

#[tokio::test]
async fn producer_side_dead_letter_is_not_missing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = sqlite(&dir, "a.db").await?;
    let b = sqlite(&dir, "b.db").await?;
    let outbox = SqliteOutbox::new(a.clone());
    let from = Utc::now() - chrono::Duration::hours(1);
    let m = step_message("steps", "k", 1);
    enqueue(&outbox, std::slice::from_ref(&m)).await?;
    let pos: i64 = sqlx::query_scalar("SELECT position FROM custody_outbox WHERE id = ?")
        .bind(m.id.to_string())
        .fetch_one(&a)
        .await?;
    custody_core::OutboxStore::acquire_leases(
        &outbox,
        "r",
        std::time::Duration::from_secs(600),
        Utc::now(),
    )
    .await?;
    let dead = custody_core::OutboxStore::dead_letter(
        &outbox,
        "r",
        pos,
        "publish failed permanently: test",
        Utc::now(),
    )
    .await?;
    assert_eq!(dead, custody_core::RowWrite::Written);
    let to = Utc::now() + chrono::Duration::minutes(1);
    let r = reconcile(
        &outbox,
        &SqliteInbox::new(b.clone()),
        &query(from, to),
        &no_progress,
    )
    .await?;
    assert!(r.is_clean(), "{r:#?}");
    assert_eq!(r.sent, 0);
    assert_eq!(r.dead_lettered.len(), 1);
    assert_eq!(r.dead_lettered[0].side, "producer");
    Ok(())
}

/// A on PostgreSQL, B on SQLite, relay + NATS JetStream in between. Lost
/// deliveries are republished by the relay with a new `Nats-Msg-Id`, well
/// inside JetStream's 2-minute duplicate window, and applied exactly once.
#[tokio::test]
async fn cross_database_over_nats_repair_republishes_through_the_relay() -> anyhow::Result<()> {
    let Some(a_db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let Some(nats_url) = custody_testkit::nats().await? else {
        return Ok(());
    };
    let a = custody_postgres::connect(&a_db.url).await?;
    custody_postgres::migrate(&a).await?;
    let dir = tempfile::tempdir()?;
    let b = sqlite(&dir, "b.db").await?;
    sqlx::query(EFFECTS_SQLITE).execute(&b).await?;
    let client = custody_nats::connect(&nats_url).await?;
    let name = custody_testkit::unique_name("custody_rec");
    let spec = custody_nats::StreamSpec::new(&name.to_uppercase(), &name);
    custody_nats::ensure_stream(&client, &spec).await?;
    let outbox = custody_postgres::PgOutbox::new(a.clone());
    let from = Utc::now() - chrono::Duration::hours(1);

    let msgs: Vec<Message> = (0..200)
        .map(|i| step_message("steps", &format!("k{}", i % 8), i64::from(i / 8 + 1)))
        .collect();
    let mut tx = a.begin().await?;
    outbox.enqueue_batch(&mut tx, &msgs).await?;
    tx.commit().await?;

    let cancel = CancellationToken::new();
    let relay = Relay::new(
        outbox.clone(),
        custody_nats::NatsPublisher::new(client.clone(), &spec),
        RelayConfig {
            poll_interval: Duration::from_millis(50),
            ..RelayConfig::default()
        },
    );
    let relay_task = tokio::spawn(relay.run(cancel.clone()));
    let sub =
        custody_nats::NatsSubscriber::new(client.clone(), &spec, "billing", &["steps".to_owned()])
            .await?;
    let mut cfg = ConsumerConfig::new("billing");
    cfg.fetch_wait = Duration::from_millis(100);
    cfg.batch_size = 200;
    let mut c = Consumer::new(SqliteInbox::new(b.clone()), sub, Recorder::default(), cfg);
    let inbox = SqliteInbox::new(b.clone());
    let to = Utc::now() + chrono::Duration::minutes(1);

    let wait_clean = |label: &'static str| {
        let outbox = outbox.clone();
        let inbox = inbox.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let r: ReconcileReport =
                    reconcile(&outbox, &inbox, &query(from, to), &no_progress).await?;
                if r.is_clean() || Instant::now() > deadline {
                    return anyhow::Ok((label, r));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let consume = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            c.run_once().await?;
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM effects")
                .fetch_one(&b)
                .await?;
            if n >= 200 || Instant::now() > deadline {
                return anyhow::Ok(c);
            }
        }
    };
    let mut c = consume.await?;
    let (_, r) = wait_clean("initial").await?;
    assert!(r.is_clean(), "{r:#?}");
    assert_eq!((r.sent, r.processed), (200, 200));

    // lose deliveries, then reconcile names exactly those
    let lost: Vec<Uuid> = sorted(msgs.iter().skip(3).step_by(41).map(|m| m.id).collect());
    lose_sqlite(&b, &lost).await?;
    let r = reconcile(&outbox, &inbox, &query(from, to), &no_progress).await?;
    assert_eq!(r.missing, lost, "{r:#?}");

    // repair: back to pending; the relay republishes as <id>:r1
    let reset = outbox.republish(&r.missing).await?;
    assert_eq!(reset, lost.len() as u64);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        c.run_once().await?;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM effects")
            .fetch_one(&b)
            .await?;
        if n >= 200 || Instant::now() > deadline {
            break;
        }
    }
    let (_, again) = wait_clean("after repair").await?;
    assert!(
        again.is_clean(),
        "repair did not get past JetStream's dedupe: {again:#?}"
    );
    let (effects, distinct): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT message_id) FROM effects")
            .fetch_one(&b)
            .await?;
    assert_eq!((effects, distinct), (200, 200));
    // the republished rows carry their new stream sequence
    let st = custody_postgres::status(&a, lost[0]).await?;
    let p = st
        .producer
        .as_ref()
        .map(|p| (p.status.as_str(), p.republished, p.publish_ref.is_some()));
    assert_eq!(p, Some(("published", 1, true)), "{st:#?}");

    cancel.cancel();
    relay_task.await??;
    let js = async_nats::jetstream::new(client.clone());
    let _ = js.delete_stream(&spec.name).await;
    Ok(())
}
