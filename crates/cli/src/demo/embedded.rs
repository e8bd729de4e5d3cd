//! The demo on embedded SQLite: A's outbox is the log B reads (no broker).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use custody::sqlite::{self, SqliteEmbeddedSubscriber, SqliteInbox, SqliteOutbox, SqliteSettings};
use custody::{Consumer, ConsumerConfig};
use sqlx::{Connection, Row, SqlitePool};
use uuid::Uuid;

use super::billing::{SqliteBilling, A_SCHEMA_SQLITE, B_SCHEMA_SQLITE};
use super::producer::produce_sqlite;
use super::report::{Observed, Report};
use super::{DemoArgs, Run, Step, Worker, WorkerArgs, Workload};

const SUBSCRIPTION: &str = "billing";

/// Where the demo keeps its two databases.
struct Dir {
    path: PathBuf,
    remove: bool,
}

impl Drop for Dir {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub(crate) fn fresh_db(dir: &Path, name: &str) -> anyhow::Result<String> {
    for suffix in ["", "-wal", "-shm"] {
        let p = dir.join(format!("{name}{suffix}"));
        if p.exists() {
            std::fs::remove_file(&p)
                .with_context(|| format!("cannot remove old {}", p.display()))?;
        }
    }
    Ok(dir.join(name).to_string_lossy().into_owned())
}

pub async fn run(args: &DemoArgs, seed: u64) -> anyhow::Result<Report> {
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            Dir {
                path: d.clone(),
                remove: false,
            }
        }
        None => {
            let p =
                std::env::temp_dir().join(format!("custody-demo-{}-{seed}", std::process::id()));
            std::fs::create_dir_all(&p)?;
            Dir {
                path: p,
                remove: true,
            }
        }
    };
    let a_path = fresh_db(&dir.path, "orders.db")?;
    let b_path = fresh_db(&dir.path, "billing.db")?;
    let a = sqlite::connect(&a_path).await?;
    let b = sqlite::connect(&b_path).await?;
    sqlite::migrate(&a).await?;
    sqlite::migrate(&b).await?;
    sqlx::query(A_SCHEMA_SQLITE).execute(&a).await?;
    sqlx::query(B_SCHEMA_SQLITE).execute(&b).await?;
    let outbox = SqliteOutbox::new(a.clone());

    eprintln!(
        "custody demo: service A (orders, {a_path}) → embedded log → service B (billing, {b_path}); {} orders over {} customers, seed {seed}",
        args.messages, args.customers
    );
    let worker_args = vec![
        "--role".to_owned(),
        "consume-embedded".to_owned(),
        "--a".to_owned(),
        a_path.clone(),
        "--b".to_owned(),
        b_path.clone(),
    ];
    let mut worker = Worker::spawn(worker_args)?;
    let mut run = Run::new(args.messages);
    let mut workload = Workload::new(seed, args.messages, args.customers);
    let mut rolled_back = Vec::new();
    let mut lock_task = None;

    for i in 0..args.messages {
        // the fault schedule, by how far the producer is
        if i == args.messages / 5 {
            run.fault("service B unavailable: its database is write-locked for 2s (consumer retries with backoff)".into());
            lock_task = Some(tokio::spawn(lock_database(
                b_path.clone(),
                Duration::from_secs(2),
            )));
        }
        if i == args.messages * 9 / 20 {
            worker.kill9().await?;
            let cp = sqlite::checkpoint(&a, SUBSCRIPTION).await?.unwrap_or(0);
            let rewound = (cp - 40).max(0);
            sqlite::set_checkpoint(&a, SUBSCRIPTION, rewound).await?;
            run.fault(format!(
                "consumer killed with SIGKILL mid-batch; checkpoint rewound {cp} → {rewound} so {} messages are delivered twice; restarted",
                cp - rewound
            ));
            worker.restart()?;
        }
        if i == args.messages * 7 / 10 {
            worker.kill9().await?;
            run.fault(
                "consumer killed with SIGKILL mid-batch; down for 1s while A keeps committing"
                    .into(),
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            worker.restart()?;
        }
        produce(&a, &outbox, &workload.step(i)?, &mut rolled_back).await?;
        if i % 50 == 0 {
            worker.check_alive()?;
            run.bar.set_position(processed(&b).await.unwrap_or(0));
        }
    }
    if let Some(t) = lock_task {
        t.await??;
    }
    let expected: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM custody_outbox WHERE topic = 'orders'")
            .fetch_one(&a)
            .await?;
    let elapsed = run
        .drain(&mut [&mut worker], expected as u64, args.timeout, || {
            processed(&b)
        })
        .await?;
    let obs = observe(&a, &b).await?;
    a.close().await;
    b.close().await;
    Ok(Report::compute(
        "embedded SQLite, consumer reading A's outbox as the log".into(),
        seed,
        run.faults,
        &rolled_back,
        &obs,
        elapsed,
    ))
}

/// Hold B's write lock for `d`: B is "down" for writers.
pub(crate) async fn lock_database(path: String, d: Duration) -> anyhow::Result<()> {
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{path}")).await?;
    sqlx::query("BEGIN IMMEDIATE").execute(&mut c).await?;
    tokio::time::sleep(d).await;
    sqlx::query("ROLLBACK").execute(&mut c).await?;
    Ok(())
}

/// Messages B has settled (processed or dead-lettered with an id).
async fn processed(b: &SqlitePool) -> anyhow::Result<u64> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM custody_inbox WHERE consumer = ?")
        .bind(SUBSCRIPTION)
        .fetch_one(b)
        .await?;
    Ok(n as u64)
}

/// One producer transaction, retried up to five times (e.g. on a busy
/// database).
async fn produce(
    a: &SqlitePool,
    outbox: &SqliteOutbox,
    step: &Step,
    rolled_back: &mut Vec<Uuid>,
) -> anyhow::Result<()> {
    let mut tries = 0;
    loop {
        tries += 1;
        let result = produce_sqlite(a, outbox, step, |id| {
            rolled_back.push(id);
            Ok(())
        })
        .await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if tries < 5 => {
                tracing::warn!(error = %e, "producer transaction failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn uuid_of(s: &str) -> anyhow::Result<Uuid> {
    Uuid::parse_str(s).with_context(|| format!("bad uuid {s:?} in a demo table"))
}

pub(crate) async fn observe(a: &SqlitePool, b: &SqlitePool) -> anyhow::Result<Observed> {
    let mut obs = Observed::default();
    for r in sqlx::query(
        "SELECT id, message_type FROM custody_outbox WHERE topic = 'orders' ORDER BY position",
    )
    .fetch_all(a)
    .await?
    {
        obs.a_outbox
            .push((uuid_of(&r.try_get::<String, _>(0)?)?, r.try_get(1)?));
    }
    for r in sqlx::query("SELECT order_id, customer, seq FROM orders")
        .fetch_all(a)
        .await?
    {
        obs.a_orders.push((
            uuid_of(&r.try_get::<String, _>(0)?)?,
            r.try_get(1)?,
            r.try_get(2)?,
        ));
    }
    for r in sqlx::query("SELECT order_id, customer, seq FROM ledger ORDER BY entry")
        .fetch_all(b)
        .await?
    {
        obs.b_ledger.push((
            uuid_of(&r.try_get::<String, _>(0)?)?,
            r.try_get(1)?,
            r.try_get(2)?,
        ));
    }
    for r in sqlx::query("SELECT message_id, duplicates FROM custody_inbox WHERE consumer = ?")
        .bind(SUBSCRIPTION)
        .fetch_all(b)
        .await?
    {
        obs.b_inbox
            .push((uuid_of(&r.try_get::<String, _>(0)?)?, r.try_get(1)?));
    }
    for d in sqlite::dead_letters(b).await? {
        obs.b_dead.push((d.message_id, d.error));
    }
    let inv: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM custody_outbox WHERE topic = 'invoices'")
            .fetch_one(b)
            .await?;
    obs.b_invoices = inv as u64;
    Ok(obs)
}

/// The billing consumer process (embedded transport).
pub async fn consume(args: &WorkerArgs) -> anyhow::Result<()> {
    let a = sqlite::connect(&args.a).await?;
    // a short busy timeout so a locked B shows up as "unavailable" and is retried
    let b = sqlite::connect_with(
        &args.b,
        SqliteSettings {
            busy_timeout: Duration::from_millis(200),
            ..SqliteSettings::default()
        },
    )
    .await?;
    let sub = SqliteEmbeddedSubscriber::new(a.clone(), SUBSCRIPTION, &["orders".to_owned()])
        .await?
        .with_poll_interval(Duration::from_millis(20));
    let handler = SqliteBilling {
        outbox: SqliteOutbox::new(b.clone()),
    };
    let mut cfg = ConsumerConfig::new(SUBSCRIPTION);
    cfg.batch_size = 50;
    Consumer::new(SqliteInbox::new(b), sub, handler, cfg)
        .run(crate::ops::shutdown_token())
        .await?;
    Ok(())
}
