//! SQLite outbox → relay → NATS JetStream → consumer → SQLite inbox.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{step_message, verdict, CrashAfterPublish, Recorder, EFFECTS_SQLITE};
use custody_core::Message;
use custody_engine::{CancellationToken, Consumer, ConsumerConfig, Relay, RelayConfig};
use custody_nats::{NatsPublisher, NatsSubscriber, StreamSpec};
use custody_sqlite::{SqliteInbox, SqliteOutbox};
use sqlx::Row;

#[tokio::test]
async fn sqlite_relay_killed_after_publish_before_mark_effect_applies_once() -> anyhow::Result<()> {
    let Some(url) = custody_testkit::nats().await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let a = custody_sqlite::connect(dir.path().join("a.db").to_str().unwrap_or_default()).await?;
    let b = custody_sqlite::connect(dir.path().join("b.db").to_str().unwrap_or_default()).await?;
    custody_sqlite::migrate(&a).await?;
    custody_sqlite::migrate(&b).await?;
    sqlx::query(EFFECTS_SQLITE).execute(&b).await?;
    let client = custody_nats::connect(&url).await?;
    let name = custody_testkit::unique_name("custody_sq");
    let spec = StreamSpec::new(&name.to_uppercase(), &name);
    custody_nats::ensure_stream(&client, &spec).await?;
    let outbox = SqliteOutbox::new(a.clone());

    // rollback → nothing; commit → the rest
    let mut tx = a.begin().await?;
    outbox
        .enqueue(&mut tx, &step_message("steps", "k", 99))
        .await?;
    tx.rollback().await?;
    let msgs: Vec<Message> = (1..=12)
        .map(|i| step_message("steps", &format!("k{}", i % 2), i))
        .collect();
    let mut tx = a.begin().await?;
    outbox.enqueue_batch(&mut tx, &msgs).await?;
    tx.commit().await?;

    let reached = Arc::new(tokio::sync::Notify::new());
    let crashing = CrashAfterPublish {
        inner: NatsPublisher::new(client.clone(), &spec),
        published: Default::default(),
        crash_after: 4,
        reached: reached.clone(),
    };
    let task = tokio::spawn(
        Relay::new(outbox.clone(), crashing, RelayConfig::default())
            .with_id("r")
            .run(CancellationToken::new()),
    );
    tokio::time::timeout(Duration::from_secs(20), reached.notified()).await?;
    task.abort();
    let _ = task.await;
    let pending: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM custody_outbox WHERE status = 0")
        .fetch_one(&a)
        .await?;
    assert_eq!(pending, 12, "published but unmarked rows stay pending");

    let mut relay = Relay::new(
        outbox.clone(),
        NatsPublisher::new(client.clone(), &spec),
        RelayConfig::default(),
    )
    .with_id("r");
    while relay.step().await? > 0 {}
    assert_eq!(relay.stats().published, 12);

    let sub = NatsSubscriber::new(client.clone(), &spec, "billing", &["steps".to_owned()]).await?;
    let mut cfg = ConsumerConfig::new("billing");
    cfg.fetch_wait = Duration::from_millis(200);
    let mut c = Consumer::new(SqliteInbox::new(b.clone()), sub, Recorder::default(), cfg);
    let deadline = Instant::now() + Duration::from_secs(20);
    let effects = || async {
        let rows = sqlx::query("SELECT message_id, k, seq FROM effects ORDER BY n")
            .fetch_all(&b)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<anyhow::Result<Vec<(String, String, i64)>>>()
    };
    while effects().await?.len() < 12 && Instant::now() < deadline {
        c.run_once().await?;
    }
    let v = verdict(&effects().await?);
    assert_eq!((v.applied, v.distinct, v.order_violations), (12, 12, 0));
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream(&spec.name).await?;
    assert_eq!(
        stream.info().await?.state.messages,
        12,
        "JetStream deduplicated the republished ids"
    );
    let _ = js.delete_stream(&spec.name).await;
    Ok(())
}
