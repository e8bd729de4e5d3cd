//! The consumer lease ([`custody_core::lease`]) on PostgreSQL: the
//! statements and the impl are custody-sql's, the fence is PostgreSQL's.
//!
//! Takeover ([`custody_sql::lease::ACQUIRE`]): the row lock of the
//! conflicting update waits for every inbox transaction of the current
//! holder (they hold FOR SHARE on the row, see CHECK), then the WHERE is
//! evaluated again on the row as those left it: a lease renewed meanwhile is
//! not taken.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::db;
use crate::PgInbox;

// The fence, first statement of each of the holder's inbox transactions.
// FOR SHARE (not FOR KEY SHARE, which an update of non-key columns does not
// wait for) keeps a takeover out until this transaction ends, so what it
// commits is committed before the next holder starts.
const CHECK: &str = "\
SELECT holder, epoch FROM custody_consumer_lease WHERE consumer = $1 FOR SHARE";

fn at(now: DateTime<Utc>) -> DateTime<Utc> {
    now
}

fn expiry(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(ttl)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

custody_sql::lease_impl! {
    inbox: PgInbox,
    backend: "postgres",
    err: db,
    check: CHECK,
    at: at,
    expiry: expiry,
}
