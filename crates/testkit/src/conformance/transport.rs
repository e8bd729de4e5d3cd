//! The transport scenarios: every [`TransportFixture`] runs each of these
//! (through [`crate::transport_conformance!`]).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::ensure;
use chrono::{SubsecRound, Utc};
use custody_core::{Delivery, Message, MessageKind, Subscriber};
use uuid::Uuid;

use super::TransportFixture;

/// How long a scenario waits for deliveries it expects.
const PATIENCE: Duration = Duration::from_secs(20);

fn message(topic: &str, key: &str, n: u64) -> anyhow::Result<Message> {
    Ok(Message::builder(topic, key, "Numbered")
        .created_at(Utc::now().trunc_subsecs(3))
        .json(&serde_json::json!({ "n": n }))?
        .build()?)
}

/// A message exercising every field, including values that need encoding.
pub fn rich_message(topic: &str, key: &str) -> anyhow::Result<Message> {
    Ok(Message::builder(topic, key, "OrderPlaced")
        .kind(MessageKind::Command)
        .created_at(Utc::now().trunc_subsecs(3))
        .payload(
            "application/json; charset=utf-8",
            br#"{"amount":990}"#.to_vec(),
        )
        .header("correlationid", "req-42")?
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )?
        .header("note", " spaces, \"quotes\", 100% and\r\na newline ")?
        .header("time", "a header named like a CloudEvents attribute")?
        .build()?)
}

/// Fetch until `n` deliveries came (or [`PATIENCE`] passed).
async fn fetch_n<S: Subscriber>(sub: &mut S, n: usize) -> anyhow::Result<Vec<Delivery<S::Token>>> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut got = Vec::new();
    while got.len() < n && tokio::time::Instant::now() < deadline {
        got.extend(sub.fetch(n - got.len(), Duration::from_millis(500)).await?);
    }
    Ok(got)
}

fn delivered_ids<T>(got: &[Delivery<T>]) -> anyhow::Result<Vec<Uuid>> {
    got.iter()
        .map(|d| match &d.message {
            Ok(m) => Ok(m.id),
            Err(bad) => anyhow::bail!("malformed delivery: {bad:?}"),
        })
        .collect()
}

/// Sent messages arrive unchanged (every field set, headers that need
/// encoding, a key with spaces and non-ASCII characters, an empty key and
/// payload too), delivered once; acked, a
/// restarted subscriber gets none of them again.
pub async fn publish_subscribe_test<F: TransportFixture>(f: F) -> anyhow::Result<()> {
    let topic = f.topic();
    let sent = vec![
        rich_message(&topic, "order-1")?,
        message(&topic, "ключ с пробелом ", 2)?,
        Message::builder(&topic, "", "Empty")
            .created_at(Utc::now().trunc_subsecs(3))
            .payload("", Vec::new())
            .build()?,
    ];
    f.send(&sent).await?;
    let mut sub = f.subscriber("billing").await?;
    let got = fetch_n(&mut sub, sent.len()).await?;
    ensure!(
        got.len() == sent.len(),
        "{} of {} arrived",
        got.len(),
        sent.len()
    );
    let mut tokens = Vec::new();
    for (d, m) in got.into_iter().zip(&sent) {
        ensure!(
            d.delivery_count == 1,
            "first delivery counted {}",
            d.delivery_count
        );
        ensure!(
            d.message.as_ref().ok() == Some(m),
            "changed on the way: {:?} vs {m:?}",
            d.message
        );
        tokens.push(d.token);
    }
    for t in tokens {
        sub.ack(t).await?;
    }
    drop(sub);
    let mut again = f.subscriber("billing").await?;
    let got = again.fetch(10, Duration::from_millis(500)).await?;
    ensure!(got.is_empty(), "acked messages came back: {}", got.len());
    Ok(())
}

/// A delivery not acked comes again to the restarted subscriber; the acked
/// one does not.
pub async fn unacked_is_redelivered_after_restart_test<F: TransportFixture>(
    f: F,
) -> anyhow::Result<()> {
    let topic = f.topic();
    let sent = vec![message(&topic, "k", 1)?, message(&topic, "k", 2)?];
    f.send(&sent).await?;
    let mut sub = f.subscriber("billing").await?;
    let mut got = fetch_n(&mut sub, 2).await?;
    ensure!(delivered_ids(&got)? == vec![sent[0].id, sent[1].id]);
    let _unacked = got.pop();
    if let Some(first) = got.pop() {
        sub.ack(first.token).await?;
    }
    drop(sub);
    let mut sub = f.subscriber("billing").await?;
    let again = fetch_n(&mut sub, 1).await?;
    ensure!(
        delivered_ids(&again)? == vec![sent[1].id],
        "the unacked message (only) must come again"
    );
    Ok(())
}

/// Messages of a key arrive in the order they were sent, keys interleaved.
pub async fn order_per_key_test<F: TransportFixture>(f: F) -> anyhow::Result<()> {
    let topic = f.topic();
    let sent: Vec<Message> = (0..30)
        .map(|n| message(&topic, &format!("k{}", n % 3), n))
        .collect::<anyhow::Result<_>>()?;
    f.send(&sent).await?;
    let mut sub = f.subscriber("billing").await?;
    let got = fetch_n(&mut sub, sent.len()).await?;
    ensure!(
        got.len() == sent.len(),
        "{} of {} arrived",
        got.len(),
        sent.len()
    );
    let mut per_key: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    for d in &got {
        if let Ok(m) = &d.message {
            per_key.entry(m.key.clone()).or_default().push(m.id);
        }
    }
    for (key, got_ids) in &per_key {
        let sent_ids: Vec<Uuid> = sent
            .iter()
            .filter(|m| &m.key == key)
            .map(|m| m.id)
            .collect();
        ensure!(&sent_ids == got_ids, "key {key} out of order");
    }
    let tokens = got.into_iter().map(|d| d.token).collect();
    sub.ack_all(tokens).await?;
    Ok(())
}

/// A subscriber that acked the first message and crashed resumes after
/// it, in order, with the unacked ones before a message sent meanwhile.
pub async fn resume_after_restart_test<F: TransportFixture>(f: F) -> anyhow::Result<()> {
    let topic = f.topic();
    let first: Vec<Message> = (0..5)
        .map(|n| message(&topic, "order-1", n))
        .collect::<anyhow::Result<_>>()?;
    f.send(&first).await?;
    let mut sub = f.subscriber("c-order").await?;
    let got = fetch_n(&mut sub, 5).await?;
    ensure!(got.len() == 5, "{} of 5 arrived", got.len());
    // processed and acked the first one, then crashed
    let mut it = got.into_iter();
    if let Some(d) = it.next() {
        sub.ack(d.token).await?;
    }
    drop(it);
    drop(sub);
    // meanwhile a later message of the same key arrives
    let later = message(&topic, "order-1", 5)?;
    f.send(std::slice::from_ref(&later)).await?;

    // the restarted consumer processes (acks) each batch as it comes
    let mut sub = f.subscriber("c-order").await?;
    let mut ids = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut extra_round = true;
    while ids.len() < 5 || std::mem::take(&mut extra_round) {
        if tokio::time::Instant::now() > deadline {
            break;
        }
        let got = sub.fetch(10, Duration::from_millis(500)).await?;
        ids.extend(delivered_ids(&got)?);
        sub.ack_all(got.into_iter().map(|d| d.token).collect())
            .await?;
    }
    let mut expected: Vec<Uuid> = first[1..].iter().map(|m| m.id).collect();
    expected.push(later.id);
    ensure!(ids == expected, "resumed with {ids:?}, want {expected:?}");
    drop(sub);
    let mut sub = f.subscriber("c-order").await?;
    let rest = sub.fetch(10, Duration::from_millis(500)).await?;
    ensure!(rest.is_empty(), "{} acked messages came back", rest.len());
    Ok(())
}
