//! Deliveries the client never hands over (a header it cannot parse makes
//! it drop the connection; another subscriber took them) are redelivered in
//! stream order, before anything after them, and a message whose headers
//! the client cannot parse is handed over as malformed with its raw bytes.

mod common;

use std::time::Duration;

use common::{rich_message, TestStream};
use custody_core::{Publisher, Subscriber};
use custody_nats::NatsSubscriber;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Publish `headers` + `payload` on `subject` over a raw TCP connection, the
/// way any client (or attacker) on the subject can: no client library
/// checks the bytes.
async fn raw_hpub(url: &str, subject: &str, headers: &[u8], payload: &[u8]) -> anyhow::Result<()> {
    let addr = url.trim_start_matches("nats://");
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    read.read_line(&mut line).await?; // INFO
    anyhow::ensure!(line.starts_with("INFO"), "expected INFO, got {line:?}");
    let mut frame = Vec::new();
    frame.extend_from_slice(
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}\r\n",
    );
    frame.extend_from_slice(
        format!(
            "HPUB {subject} {} {}\r\n",
            headers.len(),
            headers.len() + payload.len()
        )
        .as_bytes(),
    );
    frame.extend_from_slice(headers);
    frame.extend_from_slice(payload);
    frame.extend_from_slice(b"\r\nPING\r\n");
    write.write_all(&frame).await?;
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            anyhow::bail!("server closed the raw connection");
        }
        if line.starts_with("PONG") {
            return Ok(());
        }
        anyhow::ensure!(!line.starts_with("-ERR"), "server refused: {line}");
    }
}

/// Fetch and ack until `want` deliveries arrived (at most `rounds` fetches);
/// returns (stream sequence, Ok(key) | Err(reason)) in delivery order.
async fn drain(
    sub: &mut NatsSubscriber,
    want: usize,
    rounds: usize,
) -> anyhow::Result<Vec<(u64, Result<String, String>)>> {
    let mut got = Vec::new();
    for _ in 0..rounds {
        if got.len() >= want {
            break;
        }
        let batch = match sub.fetch(10, Duration::from_millis(500)).await {
            Ok(b) => b,
            Err(e) if e.retryable() => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let mut tokens = Vec::new();
        for d in batch {
            got.push((
                d.token.stream_sequence(),
                d.message
                    .as_ref()
                    .map(|m| m.key.clone())
                    .map_err(|b| b.reason.clone()),
            ));
            tokens.push(d.token);
        }
        sub.ack_all(tokens).await?;
    }
    Ok(got)
}

#[tokio::test]
async fn header_with_invalid_utf8_is_malformed_in_place_and_neighbours_keep_their_order(
) -> anyhow::Result<()> {
    let Some(ts) = TestStream::on_shared_server().await? else {
        return Ok(());
    };
    let publisher = ts.publisher();
    publisher.publish(&rich_message("orders", "k")).await?; // 1
    publisher.publish(&rich_message("orders", "k")).await?; // 2
    raw_hpub(
        &ts.url,
        &ts.spec.subject("orders"),
        b"NATS/1.0\r\nce-id: 0190b6a0-0000-7000-8000-000000000001\r\nce-custodyproducer: p\xffx\r\n\r\n",
        b"{\"amount\":1}",
    )
    .await?; // 3
    publisher.publish(&rich_message("orders", "k")).await?; // 4
    publisher.publish(&rich_message("orders", "k")).await?; // 5
    assert_eq!(ts.message_count().await?, 5);

    let mut sub = ts.subscriber("billing", &["orders".to_owned()]).await?;
    let got = drain(&mut sub, 5, 40).await?;
    let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
    // every stream sequence once more is allowed (a redelivery the inbox
    // skips), but never one before a lower one still missing: the first
    // time each appears is in stream order
    let mut firsts = Vec::new();
    for s in &seqs {
        if !firsts.contains(s) {
            firsts.push(*s);
        }
    }
    assert_eq!(firsts, vec![1, 2, 3, 4, 5], "delivery order: {got:?}");
    let (_, poison) = got.iter().find(|(s, _)| *s == 3).expect("sequence 3");
    let reason = poison.as_ref().expect_err("sequence 3 is malformed");
    assert!(reason.contains("UTF-8"), "{reason}");
    assert!(reason.contains("p\\xffx"), "raw bytes kept: {reason}");
    assert!(reason.contains("sequence 3"), "{reason}");

    // nothing is left pending: the durable went past the poison
    let more = drain(&mut sub, 1, 2).await?;
    assert!(more.is_empty(), "nothing after the five: {more:?}");
    Ok(())
}

#[tokio::test]
async fn a_delivery_taken_by_another_subscriber_is_redelivered_before_later_ones(
) -> anyhow::Result<()> {
    let Some(ts) = TestStream::on_shared_server().await? else {
        return Ok(());
    };
    let publisher = ts.publisher();
    for _ in 0..4 {
        publisher.publish(&rich_message("orders", "k")).await?;
    }
    let topics = ["orders".to_owned()];
    let mut active = ts.subscriber("billing", &topics).await?;
    // a second process on the same durable (a rolling deploy) pulls one
    // message and dies without acking it
    let mut rogue = ts.subscriber("billing", &topics).await?;
    let stolen = rogue.fetch(1, Duration::from_secs(1)).await?;
    assert_eq!(stolen.len(), 1);
    drop(rogue);

    let got = drain(&mut active, 4, 20).await?;
    let mut firsts = Vec::new();
    for (s, m) in &got {
        assert!(m.is_ok(), "{m:?}");
        if !firsts.contains(s) {
            firsts.push(*s);
        }
    }
    assert_eq!(firsts, vec![1, 2, 3, 4], "delivery order: {got:?}");
    Ok(())
}

#[tokio::test]
async fn a_message_jetstream_gives_up_on_is_handed_over_as_malformed() -> anyhow::Result<()> {
    let Some(ts) = TestStream::on_shared_server().await? else {
        return Ok(());
    };
    let m = rich_message("orders", "k");
    ts.publisher().publish(&m).await?;
    let options = custody_nats::SubscriberOptions {
        ack_wait: Duration::from_secs(1),
        max_deliver: 2,
        ..Default::default()
    };
    let mut sub = ts
        .subscriber_with("billing", &["orders".to_owned()], options)
        .await?;
    // delivered twice, never acknowledged (a consumer that hangs on it)
    for _ in 0..2 {
        let got = sub.fetch(10, Duration::from_secs(3)).await?;
        assert_eq!(got.len(), 1);
    }
    // the server gives up after the second ack_wait and says so
    let mut given_up = None;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(d) = sub.fetch(10, Duration::from_millis(200)).await?.pop() {
            given_up = Some(d);
            break;
        }
    }
    let d = given_up.expect("a delivery for the message JetStream gave up on");
    let bad = d
        .message
        .expect_err("handed over as malformed, to dead-letter");
    assert_eq!(bad.id, Some(m.id));
    assert_eq!(bad.payload, m.payload);
    assert!(bad.reason.contains("max_deliver"), "{}", bad.reason);
    sub.ack(d.token).await?;
    Ok(())
}
