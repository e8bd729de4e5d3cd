//! The consumer lease on SQLite: one holder at a time, takeovers bump the
//! epoch, and the fence (first statement of a BEGIN IMMEDIATE inbox
//! transaction) keeps a takeover out until that transaction ends. The same
//! suite as PostgreSQL (custody_testkit::conformance::lease).
#![allow(missing_docs)]

mod common;

use custody_sqlite::SqliteInbox;
use custody_testkit::conformance::lease;

use common::db;

#[tokio::test]
async fn takeover_bumps_the_epoch_and_fences_the_old_holder() -> anyhow::Result<()> {
    let (_dir, pool) = db().await?;
    lease::takeover_bumps_the_epoch_and_fences_the_old_holder_test(SqliteInbox::new(pool)).await
}

#[tokio::test]
async fn a_takeover_waits_for_the_holders_open_transaction() -> anyhow::Result<()> {
    let (dir, pool) = db().await?;
    // a second pool on the same file: another process's connection
    let other = custody_sqlite::connect(&dir.path().join("custody.db").to_string_lossy()).await?;
    lease::a_takeover_waits_for_the_holders_open_transaction_test(
        SqliteInbox::new(pool),
        SqliteInbox::new(other),
    )
    .await
}
