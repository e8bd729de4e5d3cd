//! The example run as a user runs it: the producer, the relay and the
//! consumer as processes over the machine's PostgreSQL and NATS (fresh
//! databases and stream; skipped without the services unless
//! `CUSTODY_REQUIRE_SERVICES=1`), orders posted over HTTP, then SIGTERM to
//! each. Each must exit 0 (graceful shutdown), and the billing ledger must
//! hold every order once.

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
    )?;
    let mut producer = Proc::start(
        "producer",
        env!("CARGO_BIN_EXE_pg-producer"),
        &["--database-url", &orders_db.url, "--listen", "127.0.0.1:0"],
    )?;
    let line = producer
        .wait_line("producer listening on ", Duration::from_secs(60))
        .await?;
    let base = line.trim_start_matches("producer listening on ").to_owned();
    let mut relay = Proc::start(
        "relay",
        env!("CARGO_BIN_EXE_pg-relay"),
        &[&["--database-url", &orders_db.url][..], &nats_args[..]].concat(),
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
    let deadline = Instant::now() + Duration::from_secs(90);
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
        "ledger rows after 90 s\nrelay:\n{}\nconsumer:\n{}",
        relay.lines().join("\n"),
        consumer.lines().join("\n")
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
