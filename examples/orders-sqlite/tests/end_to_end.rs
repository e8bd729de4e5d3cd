//! The example run as a user runs it: the producer and the consumer as
//! processes, orders posted over HTTP, then SIGTERM to both. Each must exit 0
//! (graceful shutdown), and the billing ledger must hold every order once.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use custody_testkit::process::{poll_until, Proc};

const ORDERS: usize = 40;

/// The programs log at `info`, whatever the test's environment says.
const LOG: &[(&str, &str)] = &[("RUST_LOG", "info")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_reach_billing_once_and_both_stop_on_sigterm() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let orders_db = dir.path().join("orders.db");
    let billing_db = dir.path().join("billing.db");
    let orders_db = orders_db.to_str().context("temp path is not UTF-8")?;
    let billing_db = billing_db.to_str().context("temp path is not UTF-8")?;

    let mut producer = Proc::start(
        "producer",
        env!("CARGO_BIN_EXE_sqlite-producer"),
        &["--db", orders_db, "--listen", "127.0.0.1:0"],
        LOG,
    )?;
    let line = producer
        .wait_line("producer listening on ", Duration::from_secs(60))
        .await?;
    let base = line.trim_start_matches("producer listening on ").to_owned();
    let mut consumer = Proc::start(
        "consumer",
        env!("CARGO_BIN_EXE_sqlite-consumer"),
        &["--orders-db", orders_db, "--db", billing_db],
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
    let billing = sqlx::SqlitePool::connect(&format!("sqlite://{billing_db}")).await?;
    let rows = poll_until(
        Duration::from_secs(60),
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
        "ledger rows after 60 s:\n{}",
        consumer.output()
    );

    consumer.terminate().await?;
    producer.terminate().await?;
    consumer
        .wait_line("consumer stopped: processed", Duration::from_secs(5))
        .await?;
    producer
        .wait_line("producer stopped", Duration::from_secs(5))
        .await?;

    // Deliver everything again (the reader's checkpoint rewound, as after a
    // lost acknowledgement): the inbox must skip every message, seen through
    // the restarted consumer's Prometheus endpoint and its last line.
    let orders = custody::sqlite::connect(orders_db).await?;
    custody::sqlite::set_checkpoint(&orders, "billing", 0).await?;
    orders.close().await;
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut again = Proc::start(
        "restarted consumer",
        env!("CARGO_BIN_EXE_sqlite-consumer"),
        &[
            "--orders-db",
            orders_db,
            "--db",
            billing_db,
            "--metrics-addr",
            &metrics_addr.to_string(),
        ],
        LOG,
    )?;
    let suppressed = poll_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let url = format!("http://{metrics_addr}/metrics");
            let Ok(resp) = http.get(url).send().await else {
                return Ok(0.0); // not serving yet
            };
            Ok(resp
                .text()
                .await?
                .lines()
                .filter(|l| l.starts_with("custody_consumer_duplicates_suppressed_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>())
        },
        |suppressed| *suppressed >= ORDERS as f64,
    )
    .await?;
    assert_eq!(
        suppressed,
        ORDERS as f64,
        "duplicates suppressed by the restarted consumer:\n{}",
        again.output()
    );
    again.terminate().await?;
    let last = again
        .wait_line("consumer stopped: processed", Duration::from_secs(5))
        .await?;
    assert_eq!(
        last,
        format!("consumer stopped: processed 0, duplicates {ORDERS}, dead-lettered 0")
    );

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
    Ok(())
}
