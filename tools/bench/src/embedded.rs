//! `outbox-embedded`: producers commit a business row + an outbox message on
//! SQLite; a consumer reads that outbox directly (the embedded transport)
//! and applies the effect through its inbox on a second SQLite database.
//!
//! Ceiling, measured in the same run: SQLite committing the same
//! business-row inserts without the outbox, same concurrency.

use std::sync::Arc;
use std::time::Duration;

use custody::sqlite::{self, SqliteEmbeddedSubscriber, SqliteInbox, SqliteOutbox};
use custody::{CancellationToken, Consumer, Handler, HandlerError, Message};
use sqlx::{Sqlite, SqlitePool, Transaction};
use uuid::Uuid;

use super::outbox::{message, KEYS};
use super::{
    key_of, pipeline_phases, warmed_rate, BenchArgs, Report, Stamps, Target, TimedInbox, TimedTx,
};

const ORDERS: &str = "CREATE TABLE IF NOT EXISTS {T} (
    id TEXT PRIMARY KEY, customer TEXT NOT NULL, data BLOB NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (unixepoch()))";
const LEDGER: &str = "CREATE TABLE IF NOT EXISTS ledger (
    entry INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL, bytes INTEGER NOT NULL)";

/// A temporary directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn run(args: &BenchArgs, report: &mut Report) -> anyhow::Result<()> {
    let dir = TempDir(std::env::temp_dir().join(format!(
        "custody-bench-{}",
        custody_scenario::services::run_tag()
    )));
    std::fs::create_dir_all(&dir.0)?;
    let a_path = dir.0.join("a.db").to_string_lossy().into_owned();
    let b_path = dir.0.join("b.db").to_string_lossy().into_owned();
    let n = args.messages_or(5_000, 50_000);
    let producers = args.producers;
    report.param("messages", n);
    report.param("keys", KEYS);
    report.param(
        "sqlite",
        "WAL, synchronous=FULL, pool of 8 (custody defaults)",
    );

    let a = sqlite::connect(&a_path).await?;
    let b = sqlite::connect(&b_path).await?;
    sqlite::migrate(&a).await?;
    sqlite::migrate(&b).await?;
    for t in ["orders", "orders_ceiling"] {
        sqlx::query(&ORDERS.replace("{T}", t)).execute(&a).await?;
    }
    sqlx::query(LEDGER).execute(&b).await?;
    let data: Arc<[u8]> = vec![b'x'; args.payload_bytes].into();

    // ceiling: SQLite commits of the business rows alone
    let op = {
        let (a, data) = (a.clone(), data.clone());
        move |i| {
            let (a, data) = (a.clone(), data.clone());
            async move { commit_row(&a, "orders_ceiling", i, &data).await }
        }
    };
    let ceiling = warmed_rate(
        report,
        producers,
        n,
        "ceiling: warm-up",
        "ceiling: SQLite commits, business row only",
        &format!("ceiling: SQLite business-row commits, {producers} producers"),
        op,
    )
    .await?;

    // the pipeline
    let stamps = Stamps::new()?;
    let cancel = CancellationToken::new();
    let outbox = SqliteOutbox::new(a.clone());
    let sub = SqliteEmbeddedSubscriber::new(a.clone(), "bench", &["orders".to_owned()])
        .await?
        .with_outbox(&outbox);
    let inbox = TimedInbox {
        inner: SqliteInbox::new(b.clone()),
        stamps: stamps.clone(),
    };
    let consumer = Consumer::new(inbox, sub, SqliteLedger, args.consumer_config());
    let consumer_task = tokio::spawn(consumer.run(cancel.clone()));

    let op = {
        let (a, data, stamps) = (a.clone(), data.clone(), stamps.clone());
        move |i| {
            let (a, data, stamps, outbox) =
                (a.clone(), data.clone(), stamps.clone(), outbox.clone());
            async move {
                let msg = message(i, &data)?;
                let mut tx = a.begin().await?;
                // the first statement writes, so the transaction takes the
                // write lock at once
                sqlx::query("INSERT INTO orders (id, customer, data) VALUES (?1, ?2, ?3)")
                    .bind(msg.id.to_string())
                    .bind(&msg.key)
                    .bind(&data[..])
                    .execute(&mut *tx)
                    .await?;
                outbox.enqueue(&mut tx, &msg).await?;
                tx.commit().await?;
                stamps.committed(msg.id);
                Ok(())
            }
        }
    };
    let phases = pipeline_phases(args, report, "embedded", &stamps, n, op).await;
    cancel.cancel();
    let consumer_stats = tokio::time::timeout(Duration::from_secs(30), consumer_task).await;
    let phases = phases?;
    if let Ok(Ok(Ok(s))) = consumer_stats {
        report.param("consumer_processed", s.processed);
        report.param("consumer_duplicates", s.duplicates);
    }
    report.compare(
        "embedded end to end",
        phases.e2e,
        "msg/s",
        Some(("SQLite row commits", ceiling)),
        None,
    );
    report.compare(
        "producer commits with outbox",
        phases.commits,
        "msg/s",
        Some(("SQLite row commits", ceiling)),
        None,
    );
    report.compare(
        "p99 commit → processed, 50% load",
        phases.half_load_p99_ms,
        "ms",
        None,
        Some(Target::AtMostMs(20.0)),
    );
    a.close().await;
    b.close().await;
    Ok(())
}

async fn commit_row(pool: &SqlitePool, table: &str, i: u64, data: &[u8]) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "INSERT INTO {table} (id, customer, data) VALUES (?1, ?2, ?3)"
    ))
    .bind(Uuid::now_v7().to_string())
    .bind(key_of(i, KEYS))
    .bind(data)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Service B's effect: one ledger row per message, in the inbox transaction.
pub struct SqliteLedger;

impl Handler<TimedTx<Transaction<'static, Sqlite>>> for SqliteLedger {
    async fn handle(
        &self,
        tx: &mut TimedTx<Transaction<'static, Sqlite>>,
        msg: &Message,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO ledger (message_id, bytes) VALUES (?1, ?2)")
            .bind(msg.id.to_string())
            .bind(i64::try_from(msg.payload.len()).unwrap_or(i64::MAX))
            .execute(&mut *tx.tx)
            .await
            .map_err(HandlerError::transient)?;
        Ok(())
    }
}
