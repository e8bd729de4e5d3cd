//! The example run as a user runs it: the producer, the relay and the
//! consumer as processes over the machine's PostgreSQL and NATS (fresh
//! databases and stream; skipped without the services unless
//! `CUSTODY_REQUIRE_SERVICES=1`), orders posted over HTTP, then SIGTERM to
//! each. Each must exit 0 (graceful shutdown), and the billing ledger must
//! hold every order once.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use custody_testkit::process::{poll_until, Proc};

const ORDERS: usize = 40;

/// The programs log at `info`, whatever the test's environment says.
const LOG: &[(&str, &str)] = &[("RUST_LOG", "info")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_reach_billing_through_nats_once_and_all_stop_on_sigterm() -> anyhow::Result<()> {
    let Some(orders_db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let Some(billing_db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let Some(nats) = custody_testkit::nats().await? else {
        return Ok(());
    };
    let stream = custody_testkit::unique_name("EXAMPLE");
    let prefix = custody_testkit::unique_name("example");
    let _cleanup = DeleteStream {
        url: nats.clone(),
        stream: stream.clone(),
    };
    let nats_args = [
        "--nats",
        &nats,
        "--stream",
        &stream,
        "--subject-prefix",
        &prefix,
    ];

    // The consumer first: it must not fail on a stream nobody created yet.
    let mut consumer = Proc::start(
        "consumer",
        env!("CARGO_BIN_EXE_pg-consumer"),
        &[&["--database-url", &billing_db.url][..], &nats_args[..]].concat(),
        LOG,
    )?;
    let mut producer = Proc::start(
        "producer",
        env!("CARGO_BIN_EXE_pg-producer"),
        &["--database-url", &orders_db.url, "--listen", "127.0.0.1:0"],
        LOG,
    )?;
    let line = producer
        .wait_line("producer listening on ", Duration::from_secs(60))
        .await?;
    let base = line.trim_start_matches("producer listening on ").to_owned();
    let mut relay = Proc::start(
        "relay",
        env!("CARGO_BIN_EXE_pg-relay"),
        &[&["--database-url", &orders_db.url][..], &nats_args[..]].concat(),
        LOG,
    )?;

    let http = reqwest::Client::new();
    let mut placed = BTreeSet::new();
    for i in 0..ORDERS {
        let resp = http
            .post(format!("{base}/orders"))
            .json(&serde_json::json!({ "customer": format!("customer-{}", i % 7), "amount_cents": 100 + i }))
            .timeout(Duration::from_secs(30))
            .send()
            .await?;
        anyhow::ensure!(
            resp.status() == reqwest::StatusCode::CREATED,
            "POST /orders answered {}",
            resp.status()
        );
        let body: serde_json::Value = resp.json().await?;
        let id = body["order_id"]
            .as_i64()
            .context("no order_id in the answer")?;
        anyhow::ensure!(
            body["message_id"].as_str().is_some_and(|m| m.len() == 36),
            "no message_id in {body}"
        );
        placed.insert(id);
    }
    assert_eq!(placed.len(), ORDERS, "every order got its own id");

    // Bounded wait until billing has applied every order.
    let billing = sqlx::PgPool::connect(&billing_db.url).await?;
    let rows = poll_until(
        Duration::from_secs(90),
        Duration::from_millis(100),
        || async {
            Ok(sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM ledger")
                .fetch_one(&billing)
                .await
                .unwrap_or(-1))
        },
        |rows| *rows >= ORDERS as i64,
    )
    .await?;
    assert_eq!(
        rows,
        ORDERS as i64,
        "ledger rows after 90 s\nrelay:\n{}\nconsumer:\n{}",
        relay.output(),
        consumer.output()
    );

    relay.terminate().await?;
    consumer.terminate().await?;
    producer.terminate().await?;
    relay
        .wait_line(
            &format!("relay stopped: published {ORDERS},"),
            Duration::from_secs(5),
        )
        .await?;
    consumer
        .wait_line(
            &format!("consumer stopped: processed {ORDERS},"),
            Duration::from_secs(5),
        )
        .await?;
    producer
        .wait_line("producer stopped", Duration::from_secs(5))
        .await?;

    // Nothing applied twice, nothing foreign: exactly the placed orders.
    let applied: Vec<i64> = sqlx::query_scalar("SELECT order_id FROM ledger ORDER BY order_id")
        .fetch_all(&billing)
        .await?;
    let distinct: BTreeSet<i64> = applied.iter().copied().collect();
    assert_eq!(
        applied.len(),
        distinct.len(),
        "an order was applied twice: {applied:?}"
    );
    assert_eq!(
        distinct, placed,
        "the ledger holds other orders than those placed"
    );
    billing.close().await;

    // Leave nothing behind (the guard deletes the stream on a failure path).
    let client = async_nats::connect(&nats).await?;
    async_nats::jetstream::new(client)
        .delete_stream(&stream)
        .await
        .with_context(|| format!("cannot delete the test's stream {stream}"))?;
    Ok(())
}

/// Deletes the test's JetStream stream when the test ends, however it ends.
struct DeleteStream {
    url: String,
    stream: String,
}

impl Drop for DeleteStream {
    fn drop(&mut self) {
        let (url, stream) = (self.url.clone(), self.stream.clone());
        custody_testkit::block_on_own_runtime(async move {
            if let Ok(client) = async_nats::connect(&url).await {
                let _ = async_nats::jetstream::new(client)
                    .delete_stream(&stream)
                    .await;
            }
        });
    }
}
