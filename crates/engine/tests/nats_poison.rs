//! A header the NATS client cannot parse, published straight onto the
//! consumed subject (raw `HPUB`), is dead-lettered by the consumer with its
//! raw bytes; the messages around it are applied once each, in order.

mod common;

use std::time::Duration;

use common::{env, step_message, verdict, Recorder};
use custody_core::Publisher;
use custody_engine::{Consumer, ConsumerConfig};
use custody_nats::NatsPublisher;
use custody_postgres::PgInbox;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

async fn raw_hpub(url: &str, subject: &str, headers: &[u8], payload: &[u8]) -> anyhow::Result<()> {
    let stream = tokio::net::TcpStream::connect(url.trim_start_matches("nats://")).await?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    read.read_line(&mut line).await?;
    let mut frame = b"CONNECT {\"verbose\":false,\"headers\":true,\"protocol\":1}\r\n".to_vec();
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
        anyhow::ensure!(read.read_line(&mut line).await? > 0, "connection closed");
        anyhow::ensure!(!line.starts_with("-ERR"), "server refused: {line}");
        if line.starts_with("PONG") {
            return Ok(());
        }
    }
}

#[tokio::test]
async fn invalid_utf8_header_is_dead_lettered_and_its_key_stays_in_order() -> anyhow::Result<()> {
    let Some(env) = env(None, "poison").await? else {
        return Ok(());
    };
    let publisher = NatsPublisher::new(env.client.clone(), &env.spec);
    for seq in 1..=3 {
        publisher.publish(&step_message("steps", "k", seq)).await?;
    }
    raw_hpub(
        &env.nats_url,
        &env.spec.subject("steps"),
        b"NATS/1.0\r\nce-id: 0190b6a0-0000-7000-8000-0000000000ff\r\nce-partitionkey: k\xfe\r\n\r\n",
        b"{\"key\":\"k\",\"seq\":99}",
    )
    .await?;
    for seq in 4..=6 {
        publisher.publish(&step_message("steps", "k", seq)).await?;
    }

    let sub = env.billing_subscriber().await?;
    let config = ConsumerConfig {
        fetch_wait: Duration::from_millis(300),
        ..ConsumerConfig::new("billing")
    };
    let mut consumer = Consumer::new(
        PgInbox::new(env.b.clone()),
        sub,
        Recorder::default(),
        config,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match consumer.run_once().await {
            Ok(_) => {}
            Err(e) if e.retryable() => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => return Err(e.into()),
        }
        let stats = consumer.stats();
        if stats.processed >= 6 && stats.dead_lettered >= 1 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "stuck: {stats:?} (the consumer never got past the message with the bad header)"
        );
    }
    let effects: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT message_id::text, k, seq FROM effects ORDER BY n")
            .fetch_all(&env.b)
            .await?;
    let v = verdict(&effects);
    assert_eq!(
        (v.applied, v.distinct, v.order_violations),
        (6, 6, 0),
        "{effects:?}"
    );
    let seqs: Vec<i64> = effects.iter().map(|e| e.2).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
    let dead: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT error, payload FROM custody_dead_letter")
            .fetch_all(&env.b)
            .await?;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].0.contains("UTF-8"), "{}", dead[0].0);
    assert!(
        dead[0].0.contains("k\\xfe"),
        "raw header bytes kept: {}",
        dead[0].0
    );
    assert_eq!(dead[0].1, b"{\"key\":\"k\",\"seq\":99}".to_vec());
    Ok(())
}
