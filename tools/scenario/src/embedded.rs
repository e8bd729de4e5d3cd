//! Services A and B on embedded SQLite: A's outbox is the log B reads (no
//! broker). Setup, the billing consumer role and the observation the report
//! is computed from, shared by the demo and chaos.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use custody::sqlite::{self, SqliteEmbeddedSubscriber, SqliteInbox, SqliteOutbox, SqliteSettings};
use custody::{Consumer, ConsumerConfig};
use sqlx::{Connection, Row, SqlitePool};
use uuid::Uuid;

use crate::billing::{SqliteBilling, A_SCHEMA_SQLITE, B_SCHEMA_SQLITE};
use crate::report::Observed;
use crate::WorkerArgs;

/// The billing consumer's subscription (inbox, dead letters, checkpoint).
pub const SUBSCRIPTION: &str = "billing";

/// The path of database `name` in `dir`, with any old copy (and its WAL
/// files) removed.
pub fn fresh_db(dir: &Path, name: &str) -> anyhow::Result<String> {
    for suffix in ["", "-wal", "-shm"] {
        let p = dir.join(format!("{name}{suffix}"));
        if p.exists() {
            std::fs::remove_file(&p)
                .with_context(|| format!("cannot remove old {}", p.display()))?;
        }
    }
    Ok(dir.join(name).to_string_lossy().into_owned())
}

/// Open A's and B's databases, migrate both and create the services' tables.
pub async fn setup(a_path: &str, b_path: &str) -> anyhow::Result<(SqlitePool, SqlitePool)> {
    let a = sqlite::connect(a_path).await?;
    let b = sqlite::connect(b_path).await?;
    sqlite::migrate(&a).await?;
    sqlite::migrate(&b).await?;
    sqlx::query(A_SCHEMA_SQLITE).execute(&a).await?;
    sqlx::query(B_SCHEMA_SQLITE).execute(&b).await?;
    Ok((a, b))
}

/// Hold B's write lock for `d`: B is "down" for writers.
pub async fn lock_database(path: String, d: Duration) -> anyhow::Result<()> {
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{path}")).await?;
    sqlx::query("BEGIN IMMEDIATE").execute(&mut c).await?;
    tokio::time::sleep(d).await;
    sqlx::query("ROLLBACK").execute(&mut c).await?;
    Ok(())
}

/// Messages B has settled (processed or dead-lettered with an id).
pub async fn processed(b: &SqlitePool) -> anyhow::Result<u64> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM custody_inbox WHERE consumer = ?")
        .bind(SUBSCRIPTION)
        .fetch_one(b)
        .await?;
    Ok(n as u64)
}

fn uuid_of(s: &str) -> anyhow::Result<Uuid> {
    Uuid::parse_str(s).with_context(|| format!("bad uuid {s:?} in a demo table"))
}

/// What A's and B's databases hold, for the report.
pub async fn observe(a: &SqlitePool, b: &SqlitePool) -> anyhow::Result<Observed> {
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

/// The consumer side of a billing process: B's database (a short busy
/// timeout, so a locked B shows up as "unavailable" and is retried) and the
/// subscriber reading A's outbox.
pub async fn consumer_side(
    args: &WorkerArgs,
    subscription: &str,
) -> anyhow::Result<(SqlitePool, SqliteEmbeddedSubscriber)> {
    let a = sqlite::connect(&args.a).await?;
    let b = sqlite::connect_with(
        &args.b,
        SqliteSettings {
            busy_timeout: Duration::from_millis(200),
            ..SqliteSettings::default()
        },
    )
    .await?;
    let sub = SqliteEmbeddedSubscriber::new(a, subscription, &["orders".to_owned()])
        .await?
        .with_poll_interval(Duration::from_millis(20));
    Ok((b, sub))
}

/// The billing consumer process (embedded transport).
pub async fn consume(args: &WorkerArgs) -> anyhow::Result<()> {
    let (b, sub) = consumer_side(args, SUBSCRIPTION).await?;
    let handler = SqliteBilling {
        outbox: SqliteOutbox::new(b.clone()),
    };
    let mut cfg = ConsumerConfig::new(SUBSCRIPTION);
    cfg.batch_size = 50;
    Consumer::new(SqliteInbox::new(b), sub, handler, cfg)
        .run(crate::process::shutdown_token())
        .await?;
    Ok(())
}
