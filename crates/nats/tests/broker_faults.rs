//! Broker crashes and restarts, on a private nats-server (never the shared one).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::rich_message;
use custody_core::{Publisher, Subscriber};
use custody_nats::{ensure_stream, NatsPublisher, NatsSubscriber, StreamSpec};

#[tokio::test]
async fn publish_fails_retryably_while_the_broker_is_down_and_works_after_restart(
) -> anyhow::Result<()> {
    let Some(mut server) = custody_testkit::NatsServer::start().await? else {
        return Ok(());
    };
    let client = custody_nats::connect(&server.url).await?;
    let spec = StreamSpec::new("CUSTODY_FAULTS", "faults");
    ensure_stream(&client, &spec).await?;
    let ack_timeout = Duration::from_secs(2);
    let publisher = NatsPublisher::new(client.clone(), &spec).with_ack_timeout(ack_timeout);

    let mut stored = Vec::new();
    for i in 0..3 {
        let m = rich_message("orders", &format!("order-{i}"));
        publisher.publish(&m).await?;
        stored.push(m);
    }

    server.stop(); // kill -9
    let start = Instant::now();
    let err = publisher
        .publish(&rich_message("orders", "while-down"))
        .await
        .expect_err("the broker is down");
    let took = start.elapsed();
    eprintln!("publish while down, after {took:?}: {err}");
    assert!(err.retryable(), "{err}");
    assert!(
        took <= ack_timeout + Duration::from_secs(1),
        "failed after {took:?}"
    );

    server.restart().await?;
    // The client reconnects by itself; a relay would retry with backoff.
    let after = rich_message("orders", "after-restart");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match publisher.publish(&after).await {
            Ok(_) => break,
            Err(e) if e.retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    stored.push(after);

    let mut sub = NatsSubscriber::new(client.clone(), &spec, "check", &[]).await?;
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !stored.iter().all(|m| seen.contains(&m.id)) {
        for d in sub.fetch(100, Duration::from_millis(500)).await? {
            if let Ok(m) = &d.message {
                seen.insert(m.id);
            }
            sub.ack(d.token).await?;
        }
    }
    for m in &stored {
        assert!(
            seen.contains(&m.id),
            "message {} (key {}) lost",
            m.id,
            m.key
        );
    }
    Ok(())
}

#[tokio::test]
async fn connect_fails_when_the_server_is_down() -> anyhow::Result<()> {
    let Some(mut server) = custody_testkit::NatsServer::start().await? else {
        return Ok(());
    };
    server.stop();
    let err = custody_nats::connect(&server.url)
        .await
        .expect_err("server is down");
    assert!(err.to_string().contains(&server.url), "{err}");
    assert!(err.retryable());
    Ok(())
}

#[tokio::test]
async fn ack_fails_while_the_broker_is_down() -> anyhow::Result<()> {
    let Some(mut server) = custody_testkit::NatsServer::start().await? else {
        return Ok(());
    };
    let client = custody_nats::connect(&server.url).await?;
    let spec = StreamSpec::new("CUSTODY_ACK", "acks");
    ensure_stream(&client, &spec).await?;
    let sent = rich_message("orders", "k");
    let id = sent.id;
    NatsPublisher::new(client.clone(), &spec)
        .publish(&sent)
        .await?;
    let options = custody_nats::SubscriberOptions {
        ack_timeout: Duration::from_secs(1),
        ack_wait: Duration::from_secs(2),
        ..Default::default()
    };
    let mut sub = NatsSubscriber::with_options(client.clone(), &spec, "c", &[], options).await?;
    let mut got = sub.fetch(1, Duration::from_secs(2)).await?;
    let d = got.pop().expect("one delivery");

    server.stop();
    let err = sub
        .ack(d.token)
        .await
        .expect_err("nobody to confirm the ack");
    eprintln!("ack while down: {err}");
    assert!(err.retryable(), "{err}");

    // By now the client has noticed; a fetch says so instead of idling.
    let err = sub
        .fetch(1, Duration::from_secs(1))
        .await
        .expect_err("not connected");
    eprintln!("fetch while down: {err}");
    assert!(err.retryable(), "{err}");

    server.restart().await?;
    // The unconfirmed ack either never reached the server (the message comes
    // back after ack_wait) or was sent late from the client's buffer after
    // the reconnect (nothing is pending). Either way nothing is lost.
    let js = async_nats::jetstream::new(client.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "neither redelivered nor acked");
        match sub.fetch(1, Duration::from_secs(1)).await {
            Ok(mut got) if !got.is_empty() => {
                let d = got.remove(0);
                // Usually the second delivery (a pull answered while the
                // client was still reconnecting can count one more); but the
                // server flushes a consumer's delivered state lazily, so a
                // SIGKILL can lose the first delivery's count and the
                // message comes back as delivery 1. What matters: it came
                // back, with the same id.
                eprintln!("redelivered, delivery_count {}", d.delivery_count);
                assert!(d.delivery_count >= 1, "{}", d.delivery_count);
                assert_eq!(d.message.as_ref().map(|m| m.id).ok(), Some(id));
                sub.ack(d.token).await?;
                break;
            }
            Ok(_) => {
                let info = js.get_stream(&spec.name).await?.consumer_info("c").await?;
                if info.num_ack_pending == 0 && info.num_pending == 0 {
                    break;
                }
            }
            Err(e) if e.retryable() => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
