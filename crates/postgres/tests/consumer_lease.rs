//! The consumer lease: one holder at a time, takeovers bump the epoch, and
//! the fence in an inbox transaction keeps a takeover out until it ends
//! (shared with SQLite: custody_testkit::conformance::lease).
#![allow(missing_docs)]

mod common;

use custody_postgres::PgInbox;
use custody_testkit::conformance::lease;

use common::db;

#[tokio::test]
async fn takeover_bumps_the_epoch_and_fences_the_old_holder() -> anyhow::Result<()> {
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    lease::takeover_bumps_the_epoch_and_fences_the_old_holder_test(PgInbox::new(pool)).await
}

#[tokio::test]
async fn a_takeover_waits_for_the_holders_open_transaction() -> anyhow::Result<()> {
    let Some((_db, pool)) = db().await? else {
        return Ok(());
    };
    let inbox = PgInbox::new(pool);
    lease::a_takeover_waits_for_the_holders_open_transaction_test(inbox.clone(), inbox).await
}
