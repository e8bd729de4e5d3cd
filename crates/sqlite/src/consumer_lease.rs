//! The consumer lease ([`custody_core::lease`]) on SQLite: the statements
//! and the impl are custody-sql's, the fence is SQLite's.
//!
//! The fence needs no row lock here: every inbox transaction begins with
//! `BEGIN IMMEDIATE` ([`SqliteInbox`]'s `begin`), so it holds the database's
//! write lock from its first statement, the lease check, to its commit. A
//! takeover is a write, so it waits for that transaction to end (busy
//! timeout) and every transaction the old holder begins after it sees the
//! new epoch and fails. The takeover upsert ([`custody_sql::lease::ACQUIRE`])
//! runs under the write lock too, so no inbox transaction of the current
//! holder is in flight while it decides.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::map_err;
use crate::{duration_ms, to_ms, SqliteInbox};

// The fence, first statement of each of the holder's inbox transactions
// (BEGIN IMMEDIATE: the write lock is already held).
const CHECK: &str = "SELECT holder, epoch FROM custody_consumer_lease WHERE consumer = $1";

fn expiry(now: DateTime<Utc>, ttl: Duration) -> i64 {
    to_ms(now).saturating_add(duration_ms(ttl))
}

custody_sql::lease_impl! {
    inbox: SqliteInbox,
    backend: "sqlite",
    err: map_err,
    check: CHECK,
    at: to_ms,
    expiry: expiry,
}
