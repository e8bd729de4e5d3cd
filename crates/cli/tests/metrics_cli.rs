//! `custody relay --metrics-addr`: the real binary publishes a SQLite
//! outbox to NATS JetStream and serves its counters in Prometheus format.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use custody::sqlite::SqliteOutbox;
use custody::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Kills the relay and deletes the test's stream whatever happens.
struct Cleanup {
    child: Child,
    nats: String,
    stream: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (url, name) = (self.nats.clone(), self.stream.clone());
        custody_testkit::block_on_own_runtime(async move {
            if let Ok(client) = custody::nats::connect(&url).await {
                let _ = async_nats::jetstream::new(client)
                    .delete_stream(&name)
                    .await;
            }
        });
    }
}

async fn scrape(addr: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body)
}

/// The value of the first sample of `name` in a Prometheus text body.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_serves_its_metrics() -> anyhow::Result<()> {
    let Some(nats) = custody_testkit::nats().await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("a.db").to_string_lossy().into_owned();
    let pool = custody::sqlite::connect(&db).await?;
    custody::sqlite::migrate(&pool).await?;
    let outbox = SqliteOutbox::new(pool.clone());
    let mut tx = pool.begin().await?;
    for i in 0..3 {
        let m = Message::builder("orders", format!("k{i}"), "OrderPlaced")
            .json(&serde_json::json!({ "n": i }))?
            .build()?;
        outbox.enqueue(&mut tx, &m).await?;
    }
    tx.commit().await?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let stream = custody_testkit::unique_name("CUSTODY_METRICS").to_uppercase();
    let prefix = custody_testkit::unique_name("metrics");
    let child = Command::new(env!("CARGO_BIN_EXE_custody"))
        .args(["relay", "--db", &db, "--nats", &nats, "--stream", &stream])
        .args(["--subject-prefix", &prefix, "--metrics-addr", &addr])
        .env("CUSTODY_LOG", "error")
        .stdout(Stdio::null())
        .spawn()?;
    let _cleanup = Cleanup {
        child,
        nats,
        stream,
    };

    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        if let Ok(body) = scrape(&addr).await {
            if sample(&body, "custody_relay_published_total").is_some_and(|v| v >= 3.0) {
                break body;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relay did not report 3 published messages on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(body.contains("200 OK"), "{body}");
    assert_eq!(
        sample(&body, "custody_relay_partitions_held"),
        Some(16.0),
        "{body}"
    );
    Ok(())
}
