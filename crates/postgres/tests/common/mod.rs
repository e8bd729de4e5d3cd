#![allow(dead_code, missing_docs)]

use custody_core::Message;
use custody_testkit::PgTestDb;
use sqlx::PgPool;

/// A fresh, migrated database, or None when PostgreSQL is unavailable (skip).
pub async fn db() -> anyhow::Result<Option<(PgTestDb, PgPool)>> {
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(None);
    };
    let pool = custody_postgres::connect(&db.url).await?;
    custody_postgres::migrate(&pool).await?;
    Ok(Some((db, pool)))
}

pub fn msg(topic: &str, key: &str, n: u64) -> Message {
    Message::builder(topic, key, "Test")
        .json(&serde_json::json!({ "n": n }))
        .and_then(|b| b.build())
        .unwrap_or_else(|e| panic!("test message: {e}"))
}

pub fn n_of(m: &Message) -> u64 {
    m.decode_json::<serde_json::Value>()
        .ok()
        .and_then(|v| v["n"].as_u64())
        .unwrap_or(u64::MAX)
}

/// Wait until every transaction of the cluster that was running when this
/// was called has ended. The visibility guard takes rows only below
/// `pg_snapshot_xmin`, which is cluster-wide: a transaction in any database
/// (another test's) holds back rows committed after it began.
pub async fn settle(pool: &PgPool) -> anyhow::Result<()> {
    let target: String = sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
        .fetch_one(pool)
        .await?;
    for _ in 0..3000 {
        let done: bool =
            sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8")
                .bind(&target)
                .fetch_one(pool)
                .await?;
        if done {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    anyhow::bail!("transactions older than xid {target} still running after 30s")
}
