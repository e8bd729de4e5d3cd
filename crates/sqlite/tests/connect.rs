//! Connecting, migrating, and how database errors are classified.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::msg;
use custody_core::OutboxStore;
use custody_sqlite::{connect, connect_with, migrate, SqliteOutbox, SqliteSettings};

#[tokio::test]
async fn urls_paths_and_memory_all_work() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("a.db");
    for target in [
        path.to_string_lossy().into_owned(),
        format!("sqlite://{}", path.to_string_lossy()),
        "sqlite::memory:".to_owned(),
    ] {
        let pool = connect(&target).await?;
        migrate(&pool).await?;
        migrate(&pool).await?; // idempotent
        let outbox = SqliteOutbox::new(pool.clone());
        outbox
            .enqueue(&mut *pool.acquire().await?, &msg("t", "k", 1))
            .await?;
        let all: Vec<u32> = (0..16).collect();
        assert!(!outbox.fetch_batch(&all, 10, Utc::now()).await?.is_empty());
    }
    let pool = connect(&path.to_string_lossy()).await?;
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await?;
    assert_eq!(mode, "wal");
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&pool)
        .await?;
    assert_eq!(sync, 2, "synchronous = FULL");
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(&pool)
        .await?;
    assert_eq!(fk, 1);
    Ok(())
}

#[tokio::test]
async fn bad_url_is_a_config_error() {
    let err = connect("sqlite://?mode=bogus")
        .await
        .expect_err("invalid url");
    assert!(matches!(err, custody_core::Error::Config(_)), "{err}");
}

#[tokio::test]
async fn busy_database_is_retryable_sql_error_is_not() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("busy.db").to_string_lossy().into_owned();
    let pool = connect_with(
        &path,
        SqliteSettings {
            busy_timeout: Duration::from_millis(50),
            ..SqliteSettings::default()
        },
    )
    .await?;
    migrate(&pool).await?;
    let outbox = SqliteOutbox::new(pool.clone());

    // Another connection holds the write lock.
    let mut holder = pool.begin_with("BEGIN IMMEDIATE").await?;
    let err = outbox
        .acquire_leases("a", Duration::from_secs(10), Utc::now())
        .await
        .expect_err("database is locked by the other connection");
    assert!(err.retryable(), "busy must be retryable: {err}");
    assert!(err.to_string().contains("acquire relay leases"), "{err}");

    // The holder itself can write; SQL errors are terminal.
    outbox.enqueue(&mut holder, &msg("t", "k", 1)).await?;
    sqlx::query("DROP TABLE custody_outbox")
        .execute(&mut *holder)
        .await?;
    let err = outbox
        .enqueue(&mut holder, &msg("t", "k", 2))
        .await
        .expect_err("table is gone");
    assert!(!err.retryable(), "{err}");
    holder.rollback().await?;
    Ok(())
}
