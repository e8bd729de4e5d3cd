//! Publisher and subscriber against the machine's NATS server: what is
//! particular to JetStream (publish, ack, redelivery, order and restart are
//! in the transport conformance suite, tests/conformance.rs).

mod common;

use std::time::{Duration, Instant};

use common::{rich_message, TestStream};
use custody_core::{Delivery, Message, Publisher, Subscriber};
use custody_nats::SubscriberOptions;

#[tokio::test]
async fn unacked_message_is_redelivered_with_delivery_count_2() -> anyhow::Result<()> {
    let Some(ts) = TestStream::on_shared_server().await? else {
        return Ok(());
    };
    let publisher = ts.publisher();
    let m = rich_message("orders", "order-1");
    publisher.publish(&m).await?;

    let options = SubscriberOptions {
        ack_wait: Duration::from_secs(1),
        ..Default::default()
    };
    let topics = ["orders".to_owned()];
    let mut sub = ts.subscriber_with("c1", &topics, options.clone()).await?;
    let first = sub.fetch(10, Duration::from_secs(2)).await?;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].delivery_count, 1);
    drop(first); // not acked
    drop(sub);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut sub = ts.subscriber_with("c1", &topics, options).await?;
    // a restarted subscriber resumes after the ack floor: the unacked
    // message comes again (as a fresh delivery of the recreated durable)
    let second = sub.fetch(10, Duration::from_secs(3)).await?;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].message.as_ref().ok(), Some(&m));
    drop(second); // not acked again: delivered again (from the stream, at once)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let third = sub.fetch(10, Duration::from_secs(3)).await?;
    assert_eq!(third.len(), 1);
    assert_eq!(third[0].delivery_count, 2);
    for d in third {
        sub.ack(d.token).await?;
    }
    // acked: a restarted subscriber gets nothing
    drop(sub);
    let mut sub = ts
        .subscriber_with("c1", &topics, SubscriberOptions::default())
        .await?;
    assert!(sub.fetch(10, Duration::from_millis(500)).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn same_id_twice_is_stored_once() -> anyhow::Result<()> {
    let Some(ts) = TestStream::on_shared_server().await? else {
        return Ok(());
    };
    let publisher = ts.publisher();
    let m = rich_message("orders", "order-1");

    let first = publisher.publish(&m).await?;
    let second = publisher.publish(&m).await?;
    assert!(!first.duplicate);
    assert!(second.duplicate, "{second:?}");
    assert_eq!(first.sequence, second.sequence);
    assert_eq!(ts.message_count().await?, 1);
    Ok(())
}

#[tokio::test]
async fn republish_is_stored_again_once_per_generation() -> anyhow::Result<()> {
    let Some(ts) = TestStream::on_shared_server().await? else {
        return Ok(());
    };
    let publisher = ts.publisher();
    let m = rich_message("orders", "order-1");

    assert!(!publisher.publish(&m).await?.duplicate);
    let again = publisher.publish_again(&m, 1).await?;
    assert!(!again.duplicate, "{again:?}");
    let twice = publisher.publish_again(&m, 1).await?;
    assert!(twice.duplicate, "{twice:?}");
    assert_eq!(ts.message_count().await?, 2);

    let mut sub = ts.subscriber("c", &[]).await?;
    let got = sub.fetch(10, Duration::from_secs(2)).await?;
    assert_eq!(got.len(), 2);
    for d in got {
        assert_eq!(d.message.as_ref().ok(), Some(&m));
        sub.ack(d.token).await?;
    }
    Ok(())
}

#[tokio::test]
async fn message_without_cloudevents_headers_is_malformed_and_does_not_block() -> anyhow::Result<()>
{
    let Some(ts) = TestStream::on_shared_server().await? else {
        return Ok(());
    };
    let js = async_nats::jetstream::new(ts.client.clone());
    let subject = ts.spec.subject("orders");

    js.publish(subject.clone(), "plain bytes".into())
        .await?
        .await?;
    let mut bad_id = async_nats::HeaderMap::new();
    bad_id.insert("ce-id", "not-a-uuid");
    bad_id.insert("ce-type", "OrderPlaced");
    bad_id.insert("ce-time", "2024-01-01T00:00:00Z");
    js.publish_with_headers(subject.clone(), bad_id, "x".into())
        .await?
        .await?;
    let mut no_type = async_nats::HeaderMap::new();
    no_type.insert("ce-id", uuid::Uuid::now_v7().to_string());
    no_type.insert("ce-time", "2024-01-01T00:00:00Z");
    js.publish_with_headers(subject.clone(), no_type, "y".into())
        .await?
        .await?;
    let good = rich_message("orders", "order-1");
    ts.publisher().publish(&good).await?;

    let mut sub = ts.subscriber("c", &[]).await?;
    let got = sub.fetch(10, Duration::from_secs(2)).await?;
    assert_eq!(got.len(), 4);
    let reasons: Vec<String> = got[..3]
        .iter()
        .map(|d| d.message.as_ref().expect_err("malformed").reason.clone())
        .collect();
    assert!(reasons[0].contains("ce-id"), "{}", reasons[0]);
    assert!(
        reasons[1].contains("ce-id") && reasons[1].contains("UUID"),
        "{}",
        reasons[1]
    );
    assert!(reasons[2].contains("ce-type"), "{}", reasons[2]);
    let raw = got[0].message.as_ref().expect_err("malformed");
    assert_eq!(raw.payload, b"plain bytes");
    assert_eq!(raw.topic, "orders");
    assert_eq!(got[3].message.as_ref().ok(), Some(&good));
    for d in got {
        sub.ack(d.token).await?;
    }
    Ok(())
}

#[tokio::test]
async fn payload_above_max_payload_is_not_retryable_and_connection_survives() -> anyhow::Result<()>
{
    let Some(ts) = TestStream::on_shared_server().await? else {
        return Ok(());
    };
    let publisher = ts.publisher();
    let limit = ts.client.server_info().max_payload;
    let big = Message::builder("orders", "k", "Big")
        .payload("application/octet-stream", vec![7u8; limit + 1])
        .build()?;

    let err = publisher.publish(&big).await.expect_err("too large");
    eprintln!("oversized: {err}");
    assert!(!err.retryable(), "{err}");
    let text = err.to_string();
    assert!(text.contains(&limit.to_string()), "{text}");
    assert!(text.contains("max_payload"), "{text}");

    // Just under the limit once headers are counted: still refused, still ours.
    let near = Message::builder("orders", "k", "Big")
        .payload("application/octet-stream", vec![7u8; limit - 10])
        .build()?;
    let err = publisher
        .publish(&near)
        .await
        .expect_err("headers count too");
    assert!(!err.retryable(), "{err}");

    publisher.publish(&rich_message("orders", "k")).await?;
    assert_eq!(ts.message_count().await?, 1);
    Ok(())
}

#[tokio::test]
async fn fetch_returns_ready_messages_without_waiting_for_a_full_batch() -> anyhow::Result<()> {
    let Some(ts) = TestStream::on_shared_server().await? else {
        return Ok(());
    };
    let mut sub = ts.subscriber("c", &[]).await?;

    let start = Instant::now();
    let got = sub.fetch(10, Duration::from_millis(400)).await?;
    let waited = start.elapsed();
    assert!(got.is_empty());
    assert!(
        waited >= Duration::from_millis(350),
        "returned after {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "returned after {waited:?}");

    let publisher = ts.publisher();
    publisher.publish(&rich_message("orders", "a")).await?;
    publisher.publish(&rich_message("orders", "b")).await?;
    let start = Instant::now();
    let got = sub.fetch(10, Duration::from_secs(5)).await?;
    assert_eq!(got.len(), 2);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "waited {:?}",
        start.elapsed()
    );

    // A message published while a fetch waits ends the wait.
    let late = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            publisher.publish(&rich_message("orders", "c")).await
        })
    };
    let start = Instant::now();
    let got2 = sub.fetch(10, Duration::from_secs(5)).await?;
    late.await??;
    assert_eq!(got2.len(), 1);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "waited {:?}",
        start.elapsed()
    );
    for d in got.into_iter().chain(got2) {
        sub.ack(d.token).await?;
    }
    Ok(())
}

#[tokio::test]
async fn topic_filters_select_subjects() -> anyhow::Result<()> {
    let Some(ts) = TestStream::on_shared_server().await? else {
        return Ok(());
    };
    let publisher = ts.publisher();
    for topic in ["a", "b", "c"] {
        publisher.publish(&rich_message(topic, "k")).await?;
    }

    let mut one = ts.subscriber("only_b", &["b".into()]).await?;
    let got = one.fetch(10, Duration::from_secs(1)).await?;
    assert_eq!(topics_of(&got), ["b"]);

    match ts.subscriber("a_and_c", &["a".into(), "c".into()]).await {
        Ok(mut two) => {
            let got = two.fetch(10, Duration::from_secs(1)).await?;
            assert_eq!(topics_of(&got), ["a", "c"]);
        }
        // nats-server < 2.10 cannot filter on several subjects: refused, not ignored.
        Err(e) => {
            eprintln!("several filters refused: {e}");
            assert!(e.to_string().contains("2.10"), "{e}");
            assert!(!e.retryable());
        }
    }
    Ok(())
}

/// The topic of each delivery, `""` for a malformed one.
fn topics_of<T>(got: &[Delivery<T>]) -> Vec<String> {
    got.iter()
        .map(|d| {
            d.message
                .as_ref()
                .map(|m| m.topic.clone())
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test]
async fn connect_to_a_dead_port_names_the_url() -> anyhow::Result<()> {
    let port = custody_testkit::free_port()?;
    let url = format!("nats://127.0.0.1:{port}");
    let err = custody_nats::connect(&url)
        .await
        .expect_err("nothing listens");
    assert!(err.to_string().contains(&url), "{err}");
    assert!(err.retryable());
    Ok(())
}
