//! Embedded transport: order, checkpoints, redelivery, malformed rows, wake-ups.
mod common;

use std::time::{Duration, Instant};

use common::{db, msg};
use custody_core::{Message, Subscriber};
use custody_sqlite::{checkpoint, set_checkpoint, SqliteEmbeddedSubscriber, SqliteOutbox};

const SHORT: Duration = Duration::from_millis(100);

async fn produce(outbox: &SqliteOutbox, msgs: &[Message]) -> anyhow::Result<Vec<i64>> {
    let mut tx = outbox.pool().begin().await?;
    let positions = outbox.enqueue_batch(&mut tx, msgs).await?;
    tx.commit().await?;
    Ok(positions)
}

fn orders() -> Vec<String> {
    vec!["orders".to_owned()]
}

#[tokio::test]
async fn reads_in_order_and_resumes_after_the_checkpoint() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let msgs: Vec<Message> = (0..6)
        .map(|i| {
            let topic = if i == 2 { "payments" } else { "orders" };
            msg(topic, &format!("k{}", i % 2), i)
        })
        .collect();
    let positions = produce(&outbox, &msgs).await?;
    let want: Vec<&Message> = msgs.iter().filter(|m| m.topic == "orders").collect();

    let mut reader = SqliteEmbeddedSubscriber::new(pool.clone(), "projector", &orders()).await?;
    let first = reader.fetch(3, SHORT).await?;
    assert_eq!(first.len(), 3);
    let got: Vec<&Message> = first
        .iter()
        .filter_map(|d| d.message.as_ref().ok())
        .collect();
    assert_eq!(got, want[..3], "position order, only subscribed topics");
    assert_eq!(first[0].token, positions[0]);
    // Acknowledge the first two only.
    reader.ack(first[0].token).await?;
    reader.ack(first[1].token).await?;
    assert_eq!(checkpoint(&pool, "projector").await?, Some(first[1].token));
    // Out-of-order ack never moves the checkpoint back.
    reader.ack(first[0].token).await?;
    assert_eq!(checkpoint(&pool, "projector").await?, Some(first[1].token));

    // The same reader continues after what it handed out.
    let rest = reader.fetch(10, SHORT).await?;
    assert_eq!(rest.len(), 2);

    // "Restart": the unacknowledged third message comes again, then the rest.
    drop(reader);
    let mut reader = SqliteEmbeddedSubscriber::new(pool.clone(), "projector", &orders()).await?;
    let again = reader.fetch(10, SHORT).await?;
    let got: Vec<&Message> = again
        .iter()
        .filter_map(|d| d.message.as_ref().ok())
        .collect();
    assert_eq!(got, want[2..]);
    assert!(reader.fetch(10, SHORT).await?.is_empty());

    // An empty topic list reads every topic; another subscription has its own checkpoint.
    let mut everything = SqliteEmbeddedSubscriber::new(pool.clone(), "audit", &[]).await?;
    assert_eq!(everything.fetch(100, SHORT).await?.len(), msgs.len());

    // Operators rewind.
    set_checkpoint(&pool, "projector", 0).await?;
    let mut reader = SqliteEmbeddedSubscriber::new(pool.clone(), "projector", &orders()).await?;
    assert_eq!(reader.fetch(100, SHORT).await?.len(), want.len());
    Ok(())
}

#[tokio::test]
async fn corrupted_headers_come_back_malformed() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let msgs = vec![msg("orders", "k", 1), msg("orders", "k", 2)];
    let positions = produce(&outbox, &msgs).await?;
    sqlx::query("UPDATE custody_outbox SET headers = 'not json' WHERE position = ?1")
        .bind(positions[0])
        .execute(&pool)
        .await?;

    let mut reader = SqliteEmbeddedSubscriber::new(pool.clone(), "r", &orders()).await?;
    let got = reader.fetch(10, SHORT).await?;
    assert_eq!(got.len(), 2, "a damaged row does not fail the fetch");
    let bad = got[0]
        .message
        .as_ref()
        .expect_err("headers column is not JSON");
    assert!(bad.reason.contains("headers"), "{}", bad.reason);
    assert_eq!(bad.id, Some(msgs[0].id));
    assert_eq!(bad.topic, "orders");
    assert_eq!(bad.payload, msgs[0].payload);
    assert_eq!(got[0].token, positions[0]);
    assert_eq!(got[1].message.as_ref().ok(), Some(&msgs[1]));
    Ok(())
}

#[tokio::test]
async fn fetch_waits_and_wakes_on_commit() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    // A poll interval far longer than the test: only the commit can wake it.
    let mut reader = SqliteEmbeddedSubscriber::new(pool.clone(), "r", &orders())
        .await?
        .with_poll_interval(Duration::from_secs(30))
        .with_outbox(&outbox);

    let start = Instant::now();
    assert!(reader
        .fetch(10, Duration::from_millis(200))
        .await?
        .is_empty());
    assert!(
        start.elapsed() >= Duration::from_millis(200),
        "waits for `wait`"
    );

    let m = msg("orders", "k", 1);
    let producer = {
        let outbox = outbox.clone();
        let m = m.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            produce(&outbox, &[m]).await
        })
    };
    let start = Instant::now();
    let got = reader.fetch(10, Duration::from_secs(10)).await?;
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "woken by the commit"
    );
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.as_ref().ok(), Some(&m));
    producer.await??;
    Ok(())
}

#[tokio::test]
async fn fetch_polls_without_an_outbox_in_process() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let mut reader = SqliteEmbeddedSubscriber::new(pool.clone(), "r", &orders())
        .await?
        .with_poll_interval(Duration::from_millis(20));
    let producer = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            produce(&outbox, &[msg("orders", "k", 1)]).await
        })
    };
    let got = reader.fetch(10, Duration::from_secs(10)).await?;
    assert_eq!(got.len(), 1);
    producer.await??;
    Ok(())
}
