//! The example run as a user runs it: the producer and the consumer as
//! processes, orders posted over HTTP, then SIGTERM to both. Each must exit 0
//! (graceful shutdown), and the billing ledger must hold every order once.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const ORDERS: usize = 40;

/// A started program and what it printed so far (stdout and stderr, in order).
struct Proc {
    name: &'static str,
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn start(name: &'static str, exe: &str, args: &[&str]) -> anyhow::Result<Proc> {
        let mut child = Command::new(exe)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {exe}"))?;
        let output = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            collect(BufReader::new(out), output.clone());
        }
        if let Some(err) = child.stderr.take() {
            collect(BufReader::new(err), output.clone());
        }
        Ok(Proc {
            name,
            child,
            output,
        })
    }

    fn lines(&self) -> Vec<String> {
        self.output.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The first line starting with `prefix`, waiting at most `within`.
    async fn wait_line(&mut self, prefix: &str, within: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| l.starts_with(prefix)) {
                return Ok(l);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before printing {prefix:?}:\n{}",
                    self.name,
                    self.lines().join("\n")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} printed no {prefix:?} within {within:?}:\n{}",
                    self.name,
                    self.lines().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Send SIGTERM and wait (bounded) for the exit; the status must be 0.
    async fn terminate(&mut self) -> anyhow::Result<()> {
        let pid = self.child.id().context("process already reaped")?;
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(sent.success(), "kill -TERM {pid} failed");
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .with_context(|| format!("{} did not stop within 30 s of SIGTERM", self.name))??;
        // let the readers take the last lines
        tokio::time::sleep(Duration::from_millis(100)).await;
        anyhow::ensure!(
            status.success(),
            "{} exited with {status} after SIGTERM, not 0:\n{}",
            self.name,
            self.lines().join("\n")
        );
        Ok(())
    }
}

fn collect<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    reader: BufReader<R>,
    into: Arc<Mutex<Vec<String>>>,
) {
    tokio::spawn(async move {
        let mut lines = reader.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(mut v) = into.lock() {
                v.push(line);
            }
        }
    });
}

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
    )?;
    let line = producer
        .wait_line("producer listening on ", Duration::from_secs(60))
        .await?;
    let base = line.trim_start_matches("producer listening on ").to_owned();
    let mut consumer = Proc::start(
        "consumer",
        env!("CARGO_BIN_EXE_sqlite-consumer"),
        &["--orders-db", orders_db, "--db", billing_db],
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
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut rows: i64 = -1;
    while Instant::now() < deadline {
        rows = sqlx::query_scalar("SELECT COUNT(*) FROM ledger")
            .fetch_one(&billing)
            .await
            .unwrap_or(-1);
        if rows >= ORDERS as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        rows,
        ORDERS as i64,
        "ledger rows after 60 s:\n{}",
        consumer.lines().join("\n")
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
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut suppressed = 0.0;
    while Instant::now() < deadline && suppressed < ORDERS as f64 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(resp) = http
            .get(format!("http://{metrics_addr}/metrics"))
            .send()
            .await
        else {
            continue;
        };
        suppressed = resp
            .text()
            .await?
            .lines()
            .filter(|l| l.starts_with("custody_consumer_duplicates_suppressed_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
    }
    assert_eq!(
        suppressed,
        ORDERS as f64,
        "duplicates suppressed by the restarted consumer:\n{}",
        again.lines().join("\n")
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
