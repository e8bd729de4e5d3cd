#![allow(dead_code)]

use custody_core::Message;
use sqlx::SqlitePool;
use tempfile::TempDir;

/// A fresh, migrated database file in its own temp dir (kept alive by the `TempDir`).
pub async fn db() -> anyhow::Result<(TempDir, SqlitePool)> {
    let dir = tempfile::tempdir()?;
    let pool = custody_sqlite::connect(&dir.path().join("custody.db").to_string_lossy()).await?;
    custody_sqlite::migrate(&pool).await?;
    Ok((dir, pool))
}

/// A JSON message `n` on `topic` ordered by `key`. `created_at` is cut to
/// milliseconds, the precision the SQLite schema stores, so messages compare
/// equal after a round trip.
pub fn msg(topic: &str, key: &str, n: u64) -> Message {
    use chrono::SubsecRound;
    Message::builder(topic, key, "Numbered")
        .created_at(chrono::Utc::now().trunc_subsecs(3))
        .json(&n)
        .and_then(|b| b.build())
        .unwrap_or_else(|e| panic!("test message: {e}"))
}

pub fn all_partitions(n: u32) -> Vec<u32> {
    (0..n).collect()
}
