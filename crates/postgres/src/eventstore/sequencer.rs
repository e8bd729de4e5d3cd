//! The sequencer: gives committed appends their global-log positions, in
//! commit order, after they commit (docs/EVENTSTORE_POSTGRES.md).
//!
//! Why a reader of `WHERE position > last` then never skips a commit
//! (docs/ARCHITECTURE.md invariant 5):
//!
//! - An append inserts one `custody_event_pending` row in its own
//!   transaction. The row becomes visible exactly when the append commits;
//!   a rolled-back append leaves none.
//! - A sequencing run holds the `custody_event_head` row lock from its first
//!   statement to its commit, so runs take turns and each one starts after
//!   the previous one committed. Its DELETE of pending rows runs under READ
//!   COMMITTED with a snapshot taken after the lock was granted: it sees
//!   exactly the appends committed by then, and numbers them above the head,
//!   densely.
//! - So positions exist only once the appends they number have committed,
//!   and a later run's positions are all higher. A reader whose snapshot
//!   sees a run's commit rows sees every earlier run's rows too, and the
//!   events of every append they number (committed before the run began).
//!   Nothing below a visible position can appear later: no gap, no skip.
//!
//! No append waits for the sequencer (they touch other rows), no timeout
//! jumps anything (a transaction open for an hour is numbered when it
//! commits; everyone committed meanwhile is numbered at once), and nothing
//! reads the cluster-wide `pg_snapshot_xmin`: an open transaction elsewhere
//! in the cluster delays no one.
//!
//! Runs take turns on a row lock that a reader waits for, not on a
//! `pg_try_advisory_xact_lock` that a reader gives up on: a reader that
//! finds a run in progress waits for it and then runs its own, so once
//! `head()` returns, every append committed before the call has its
//! position (read your own append). With a try-lock the reader would have
//! to wait for a second notification from the run that beat it. The same
//! lock guards the head row the run updates. Runs are a few statements on a
//! handful of rows, so waiting is short.
//!
//! A run that dies (its backend terminated, the client gone) rolls back:
//! the pending rows come back, the head is unchanged, and the next run
//! numbers them. `idle_in_transaction_session_timeout` is set for the run so
//! a client that stalls mid-run (a network partition) releases the head
//! lock after [`STALLED_RUN`] instead of holding up every reader.

use sqlx::{PgConnection, PgPool};

use crate::error::db;

/// A sequencing run whose client stops talking for this long is ended by
/// the server (its transaction rolls back; the next run redoes it).
const STALLED_RUN: &str = "10s";

/// Appends numbered per statement; a run loops until fewer are left.
const RUN_LIMIT: i64 = 50_000;

/// Whether committed appends wait for their positions. Cheap (the table
/// holds only appends not yet sequenced); when false, every append that
/// committed before this statement has its position.
const ANY_PENDING: &str = "SELECT EXISTS (SELECT 1 FROM custody_event_pending)";

/// Take the head row lock (runs take turns on it; held to commit) and read
/// the head. After this, the next statement's snapshot includes every
/// append committed before the lock was granted.
const LOCK_HEAD: &str = "SELECT set_config('idle_in_transaction_session_timeout', $1, true), head \
     FROM custody_event_head WHERE id FOR UPDATE";

/// Number up to `$2` committed pending appends above head `$1`, in tx
/// order, densely; record them in custody_event_commits; move the head.
///
/// Order inside one run is by tx. Per-stream version order is preserved:
/// the appender of version v+1 takes the stream row lock only after the
/// transaction that wrote version v has committed (it held that lock until
/// then), and takes its tx number (nextval, CACHE 1) after the lock, so its
/// tx is larger; and if v+1 has committed by this run's snapshot, v has too.
const RUN: &str = "\
WITH moved AS (
    DELETE FROM custody_event_pending
    WHERE tx IN (SELECT tx FROM custody_event_pending ORDER BY tx LIMIT $2)
    RETURNING tx, n
), numbered AS (
    SELECT tx, n, $1::int8 + sum(n) OVER (ORDER BY tx) AS last_position FROM moved
), ins AS (
    INSERT INTO custody_event_commits (tx, first_position, last_position)
    SELECT tx, last_position - n + 1, last_position FROM numbered
), moved_head AS (
    UPDATE custody_event_head SET head = $1::int8 + (SELECT sum(n) FROM moved)
    WHERE id AND EXISTS (SELECT 1 FROM moved)
)
SELECT count(*), $1::int8 + coalesce(sum(n), 0)::int8 FROM moved";

/// The head and whether appends wait for positions, from one snapshot:
/// when none waits, every append committed before this statement is
/// numbered at or below this head.
const HEAD: &str = "SELECT head, EXISTS (SELECT 1 FROM custody_event_pending) \
     FROM custody_event_head WHERE id";

/// Run the sequencer if any committed append has no position yet; returns
/// nothing. Afterwards every append committed before the call has its
/// position.
pub(crate) async fn sequence_if_pending(pool: &PgPool) -> custody_core::Result<()> {
    let pending: bool = sqlx::query_scalar(ANY_PENDING)
        .fetch_one(pool)
        .await
        .map_err(db("check pending event appends"))?;
    if pending {
        sequence(pool).await?;
    }
    Ok(())
}

/// The gap-free head, after numbering every append committed before the
/// call (one round trip when none waits).
pub(crate) async fn head(pool: &PgPool) -> custody_core::Result<u64> {
    let (head, pending): (i64, bool) = sqlx::query_as(HEAD)
        .fetch_one(pool)
        .await
        .map_err(db("read event head"))?;
    if pending {
        return sequence(pool).await;
    }
    Ok(u64::try_from(head).unwrap_or(0))
}

/// One sequencing run in its own transaction; returns the head after it.
pub(crate) async fn sequence(pool: &PgPool) -> custody_core::Result<u64> {
    const OP: &str = "sequence events";
    let mut tx = pool.begin().await.map_err(db(OP))?;
    let head = run(&mut tx).await.map_err(db(OP))?;
    tx.commit().await.map_err(db(OP))?;
    Ok(head)
}

async fn run(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    let (_, mut head): (String, i64) = sqlx::query_as(LOCK_HEAD)
        .bind(STALLED_RUN)
        .fetch_one(&mut *conn)
        .await?;
    loop {
        let (moved, new_head): (i64, i64) = sqlx::query_as(RUN)
            .bind(head)
            .bind(RUN_LIMIT)
            .fetch_one(&mut *conn)
            .await?;
        head = new_head;
        if moved > 0 {
            tracing::debug!(appends = moved, head, "custody: event positions given");
        }
        if moved < RUN_LIMIT {
            return Ok(u64::try_from(head).unwrap_or(0));
        }
    }
}
