//! The PostgreSQL event store (PgEventStore) on a real server, each test on
//! its own database: no skipped commit under out-of-order commits, a
//! transaction held open, an open transaction in another database and a
//! sequencer killed mid-run (docs/ARCHITECTURE.md invariant 5); concurrent
//! appenders, write combining, append_in in the caller's transaction, and
//! the append condition (append_if).
#![allow(missing_docs)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use custody_core::event::{
    AppendCondition, AppendOutcome, Direction, EventData, EventStore, ExpectedVersion, LogFilter,
    Query, QueryItem,
};
use custody_postgres::{PgEventStore, PgOutbox};
use custody_testkit::conformance::eventstore::EventStoreFixture;
use custody_testkit::PgTestDb;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

/// The conformance suite's fixture: a fresh, migrated database.
struct Postgres {
    _db: PgTestDb,
    store: PgEventStore,
}

impl EventStoreFixture for Postgres {
    type Store = PgEventStore;

    async fn fresh() -> anyhow::Result<Option<Self>> {
        Ok(common::db().await?.map(|(db, pool)| Postgres {
            _db: db,
            store: PgEventStore::new(pool),
        }))
    }

    fn store(&self) -> PgEventStore {
        self.store.clone()
    }
}

/// The conformance suite with write combining on (the default).
mod conformance {
    use super::Postgres;
    custody_testkit::eventstore_conformance!(Postgres);
}

/// ... and off: every append in its own transaction.
struct Uncombined(Postgres);

impl EventStoreFixture for Uncombined {
    type Store = PgEventStore;

    async fn fresh() -> anyhow::Result<Option<Self>> {
        Ok(Postgres::fresh().await?.map(|f| {
            Uncombined(Postgres {
                store: f.store.clone().with_write_combining(false),
                _db: f._db,
            })
        }))
    }

    fn store(&self) -> PgEventStore {
        self.0.store.clone()
    }
}

mod uncombined {
    use super::Uncombined;
    custody_testkit::eventstore_conformance!(Uncombined);
}

fn event(n: u64) -> EventData {
    EventData::json("Happened", &serde_json::json!({ "n": n }))
        .unwrap_or_else(|e| panic!("test event: {e}"))
}

fn tagged(event_type: &str, tags: &[&str]) -> EventData {
    tags.iter().fold(
        EventData::new(event_type, "application/json", b"{}".to_vec()),
        |e, t| e.tag(*t),
    )
}

/// A reader of the global log that checks, on every read, that positions
/// only go up and nothing is delivered twice.
struct Reader {
    after: u64,
    seen: Vec<(u64, Uuid)>,
}

impl Reader {
    fn new() -> Self {
        Reader {
            after: 0,
            seen: Vec::new(),
        }
    }

    /// Read everything up to the head now; returns the ids read.
    async fn read(&mut self, store: &PgEventStore) -> anyhow::Result<Vec<Uuid>> {
        let mut got = Vec::new();
        loop {
            let slice = store.read_all(self.after, &LogFilter::all(), 100).await?;
            for e in &slice.events {
                ensure!(
                    e.position > self.after,
                    "position {} after {}: not increasing",
                    e.position,
                    self.after
                );
                self.after = e.position;
                self.seen.push((e.position, e.id));
                got.push(e.id);
            }
            ensure!(slice.scanned_to >= self.after, "scanned_to went back");
            self.after = slice.scanned_to;
            if slice.events.is_empty() {
                return Ok(got);
            }
        }
    }

    /// Positions delivered, in delivery order: 1, 2, 3, ... with no gap.
    fn check_dense(&self) -> anyhow::Result<()> {
        for (i, (p, _)) in self.seen.iter().enumerate() {
            ensure!(
                *p == i as u64 + 1,
                "delivery {i} had position {p}: {:?}",
                self.seen
            );
        }
        Ok(())
    }
}

async fn tx_of(pool: &PgPool, id: Uuid) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT tx FROM custody_events WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?,
    )
}

/// Wait (at most 10 s) until `n` backends of this database wait for a
/// lock while running a statement that contains `pattern`; returns their pids.
async fn lock_waiters(pool: &PgPool, pattern: &str, n: usize) -> anyhow::Result<Vec<i32>> {
    for _ in 0..1000 {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND position($1 in query) > 0",
        )
        .bind(pattern)
        .fetch_all(pool)
        .await?;
        if pids.len() >= n {
            return Ok(pids);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("fewer than {n} backends waited for a lock in a statement with {pattern:?} within 10 s")
}

async fn lock_waiter(pool: &PgPool, pattern: &str) -> anyhow::Result<i32> {
    Ok(lock_waiters(pool, pattern, 1).await?[0])
}

async fn wait_queued(store: &PgEventStore, n: usize) -> anyhow::Result<()> {
    for _ in 0..1000 {
        if store.queued_appends() >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!(
        "{} appends queued, expected {n}, after 10 s",
        store.queued_appends()
    )
}

fn appended(o: &AppendOutcome) -> anyhow::Result<u64> {
    match o {
        AppendOutcome::Appended(a) => Ok(a.version),
        other => bail!("expected an append, got {other:?}"),
    }
}

/// The basics on a real database: versions, a conflict as an outcome with
/// the actual version, an idempotent retry, stream reads, the log.
#[tokio::test]
async fn append_read_conflict_and_retry() -> anyhow::Result<()> {
    let Some((_db, pool)) = common::db().await? else {
        return Ok(());
    };
    let store = PgEventStore::new(pool.clone());
    let batch = vec![event(1), event(2)];
    let out = store
        .append("order-1", ExpectedVersion::NoStream, batch.clone())
        .await?;
    ensure!(appended(&out)? == 2, "{out:?}");
    let retry = store
        .append("order-1", ExpectedVersion::NoStream, batch.clone())
        .await?;
    ensure!(
        retry
            .appended()
            .is_some_and(|a| a.idempotent && a.version == 2 && a.first_version == 1),
        "a retried append is idempotent: {retry:?}"
    );
    let conflict = store
        .append("order-1", ExpectedVersion::Exact(1), vec![event(3)])
        .await?;
    ensure!(
        conflict
            == AppendOutcome::WrongVersion {
                expected: ExpectedVersion::Exact(1),
                actual: Some(2)
            },
        "{conflict:?}"
    );
    // an id of order-1 appended to another stream is refused, naming it
    let err = store
        .append("order-2", ExpectedVersion::Any, vec![batch[0].clone()])
        .await
        .err()
        .context("an id used by another stream must be refused")?;
    ensure!(err.to_string().contains("order-1"), "{err}");
    store
        .append("order-2", ExpectedVersion::Any, vec![event(4)])
        .await?;

    let read = store
        .read_stream("order-1", Direction::Backward, u64::MAX, 10)
        .await?;
    let versions: Vec<u64> = read.events.iter().map(|e| e.version).collect();
    ensure!(versions == [2, 1] && read.version == Some(2), "{read:?}");
    let all = store.read_all(0, &LogFilter::all(), 10).await?;
    let positions: Vec<u64> = all.events.iter().map(|e| e.position).collect();
    ensure!(
        positions == [1, 2, 3] && all.head == 3,
        "{positions:?} {all:?}"
    );
    ensure!(all.events[2].stream == "order-2");
    let orders_only = LogFilter {
        types: vec!["Nope".into()],
        ..LogFilter::all()
    };
    let none = store.read_all(0, &orders_only, 10).await?;
    ensure!(none.events.is_empty() && none.scanned_to == 3, "{none:?}");
    Ok(())
}

/// T1 takes the lower tx and stays open; T2 appends and commits; a reader
/// sees T2's event. Then T1 commits and the reader's next read returns it:
/// nothing skipped, positions increasing in the order readers got them.
#[tokio::test]
async fn out_of_order_commit_is_not_skipped() -> anyhow::Result<()> {
    let Some((_db, pool)) = common::db().await? else {
        return Ok(());
    };
    let store = PgEventStore::new(pool.clone());
    let mut reader = Reader::new();

    let mut t1 = pool.begin().await?;
    let e1 = event(1);
    let out = store
        .append_in(&mut t1, "a-1", ExpectedVersion::NoStream, vec![e1.clone()])
        .await?;
    appended(&out)?;
    let e2 = event(2);
    appended(
        &store
            .append("b-1", ExpectedVersion::NoStream, vec![e2.clone()])
            .await?,
    )?;
    // the interleaving really happened: T1 was numbered (tx) first
    let tx2 = tx_of(&pool, e2.id).await?;
    let tx1: i64 = sqlx::query_scalar("SELECT tx FROM custody_events WHERE id = $1")
        .bind(e1.id)
        .fetch_one(&mut *t1)
        .await?;
    ensure!(tx1 < tx2, "T1 must hold the lower number: {tx1} vs {tx2}");

    ensure!(reader.read(&store).await? == [e2.id], "{:?}", reader.seen);
    t1.commit().await?;
    ensure!(
        reader.read(&store).await? == [e1.id],
        "T1's event must come after T2's, not be skipped: {:?}",
        reader.seen
    );
    reader.check_dense()?;
    // and a reader from the start sees the same order
    let mut fresh = Reader::new();
    fresh.read(&store).await?;
    ensure!(
        fresh.seen == reader.seen,
        "{:?} vs {:?}",
        fresh.seen,
        reader.seen
    );
    Ok(())
}

/// A transaction holds an append open for 10 s while others commit: theirs
/// are readable meanwhile (positions go only to committed appends, so no
/// head-of-line block), and the held one is delivered after it commits.
#[tokio::test]
async fn a_transaction_held_open_10s_blocks_no_one_and_is_delivered() -> anyhow::Result<()> {
    let Some((_db, pool)) = common::db().await? else {
        return Ok(());
    };
    let store = PgEventStore::new(pool.clone());
    let mut reader = Reader::new();
    let mut held = pool.begin().await?;
    let slow = event(0);
    appended(
        &store
            .append_in(
                &mut held,
                "slow-1",
                ExpectedVersion::Any,
                vec![slow.clone()],
            )
            .await?,
    )?;
    let started = std::time::Instant::now();
    let mut others = Vec::new();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(10) {
        n += 1;
        let e = event(n);
        appended(
            &store
                .append(
                    &format!("fast-{n}"),
                    ExpectedVersion::NoStream,
                    vec![e.clone()],
                )
                .await?,
        )?;
        others.push(e.id);
        // each commit is readable while the slow transaction is open
        let got = reader.read(&store).await?;
        ensure!(
            got == [e.id],
            "append {n}: read {got:?} while the slow one is open"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    held.commit().await?;
    let got = reader.read(&store).await?;
    ensure!(
        got == [slow.id],
        "the held append after its commit: {got:?}"
    );
    reader.check_dense()?;
    ensure!(reader.seen.len() == others.len() + 1);
    Ok(())
}

/// A transaction open in another database of the cluster (holding an xid)
/// does not keep a reader from new commits here. A pg_snapshot_xmin guard
/// would: the second assertion shows the appending transaction's xid is
/// not below the snapshot's xmin, so `txid < xmin` would hide it.
#[tokio::test]
async fn an_open_transaction_elsewhere_in_the_cluster_delays_no_reader() -> anyhow::Result<()> {
    let Some((_db, pool)) = common::db().await? else {
        return Ok(());
    };
    let Some(other_db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let mut other = PgConnection::connect(&other_db.url).await?;
    sqlx::query("BEGIN").execute(&mut other).await?;
    let other_xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut other)
        .await?;

    let store = PgEventStore::new(pool.clone());
    let mut tx = pool.begin().await?;
    let e = event(1);
    appended(
        &store
            .append_in(
                &mut tx,
                "order-1",
                ExpectedVersion::NoStream,
                vec![e.clone()],
            )
            .await?,
    )?;
    let our_xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;

    let slice = store.read_all(0, &LogFilter::all(), 10).await?;
    ensure!(
        slice.events.iter().map(|e| e.id).collect::<Vec<_>>() == [e.id],
        "the commit must be readable while another database holds a transaction: {slice:?}"
    );
    let hidden_by_xmin_guard: bool = sqlx::query_scalar(
        "SELECT NOT ($1::xid8 < pg_snapshot_xmin(pg_current_snapshot())) \
         AND pg_snapshot_xmin(pg_current_snapshot()) <= $2::xid8",
    )
    .bind(&our_xid)
    .bind(&other_xid)
    .fetch_one(&pool)
    .await?;
    ensure!(
        hidden_by_xmin_guard,
        "an xmin guard would hide xid {our_xid} while xid {other_xid} is open elsewhere"
    );
    sqlx::query("ROLLBACK").execute(&mut other).await?;
    let _ = other.close().await;
    Ok(())
}

/// The sequencer's backend is terminated mid-run (after it took the pending
/// rows, while inserting positions): its transaction rolls back, the next
/// run numbers everything, and no position is lost or given twice.
#[tokio::test]
async fn a_sequencer_killed_mid_run_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let Some((_db, pool)) = common::db().await? else {
        return Ok(());
    };
    let store = PgEventStore::new(pool.clone());
    let mut ids = Vec::new();
    for n in 0..5 {
        let e = event(n);
        ids.push(e.id);
        appended(
            &store
                .append(&format!("s-{n}"), ExpectedVersion::NoStream, vec![e])
                .await?,
        )?;
    }
    // Hold a commits row for the first pending tx, uncommitted: the run
    // blocks on it, mid-statement, having deleted the pending rows.
    let first: i64 = sqlx::query_scalar("SELECT min(tx) FROM custody_event_pending")
        .fetch_one(&pool)
        .await?;
    let mut blocker = pool.begin().await?;
    sqlx::query(
        "INSERT INTO custody_event_commits (tx, first_position, last_position) VALUES ($1, -1, -1)",
    )
    .bind(first)
    .execute(&mut *blocker)
    .await?;
    let running = tokio::spawn({
        let store = store.clone();
        async move { store.head().await }
    });
    let pid = lock_waiter(&pool, "custody_event_pending").await?;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&pool)
        .await?;
    ensure!(killed, "could not terminate the sequencer's backend {pid}");
    let outcome = tokio::time::timeout(Duration::from_secs(10), running).await??;
    ensure!(
        outcome.is_err(),
        "the killed run must fail, got {outcome:?}"
    );
    blocker.rollback().await?;

    ensure!(store.head().await? == 5, "head after the next run");
    let mut reader = Reader::new();
    let got: BTreeSet<Uuid> = reader.read(&store).await?.into_iter().collect();
    reader.check_dense()?;
    ensure!(got == ids.iter().copied().collect(), "every event once");
    let (pending, commits, numbered): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM custody_event_pending), count(*), \
         coalesce(sum(last_position - first_position + 1), 0)::int8 FROM custody_event_commits",
    )
    .fetch_one(&pool)
    .await?;
    ensure!(
        (pending, commits, numbered) == (0, 5, 5),
        "{pending} pending, {commits} commits, {numbered} positions"
    );
    Ok(())
}

/// 8 appenders race with `Exact` on one stream: exactly one wins each
/// version, the stream's versions are 1..=40 without a gap, and its events
/// are exactly the winners'.
#[tokio::test]
async fn eight_concurrent_exact_appenders_one_winner_per_version() -> anyhow::Result<()> {
    let Some((_db, pool)) = common::db().await? else {
        return Ok(());
    };
    for combining in [true, false] {
        let store = PgEventStore::new(pool.clone()).with_write_combining(combining);
        let stream = format!("race-{combining}");
        let mut tasks = Vec::new();
        for w in 0..8u64 {
            let store = store.clone();
            let stream = stream.clone();
            tasks.push(tokio::spawn(async move {
                let mut won = Vec::new();
                let mut conflicts = 0u64;
                let mut version = 0;
                while version < 40 {
                    let e = event(w);
                    match store
                        .append(&stream, ExpectedVersion::Exact(version), vec![e.clone()])
                        .await?
                    {
                        AppendOutcome::Appended(a) => {
                            won.push((a.version, e.id));
                            version = a.version;
                        }
                        AppendOutcome::WrongVersion { actual, .. } => {
                            conflicts += 1;
                            version = actual.unwrap_or(0);
                        }
                        other => bail!("unexpected {other:?}"),
                    }
                }
                Ok::<_, anyhow::Error>((won, conflicts))
            }));
        }
        let mut won = Vec::new();
        for t in tasks {
            let (w, _) = t.await??;
            won.extend(w);
        }
        won.sort();
        let versions: Vec<u64> = won.iter().map(|(v, _)| *v).collect();
        ensure!(
            versions == (1..=40).collect::<Vec<_>>(),
            "combining {combining}: one winner per version: {versions:?}"
        );
        let read = store
            .read_stream(&stream, Direction::Forward, 1, 100)
            .await?;
        let stored: Vec<(u64, Uuid)> = read.events.iter().map(|e| (e.version, e.id)).collect();
        ensure!(
            stored == won,
            "combining {combining}: stored events are the winners'"
        );
        ensure!(read.version == Some(40));
    }
    Ok(())
}

/// Appends queued while the combiner's transactions run go together in
/// the next one: a conflict among them (three `NoStream` on one stream:
/// one wins) fails none of the others.
#[tokio::test]
async fn write_combining_combines_and_a_conflict_fails_no_other() -> anyhow::Result<()> {
    let Some((_db, pool)) = common::db().await? else {
        return Ok(());
    };
    let store = PgEventStore::new(pool.clone());
    // Hold both combiner tasks' transactions at their insert of the pending row.
    let mut blocker = pool.begin().await?;
    sqlx::query("LOCK TABLE custody_event_pending IN EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await?;
    let mut first = Vec::new();
    // Streams the queued appends do not touch: whichever first transaction
    // commits last cannot hold a row lock the combined one would skip.
    for (n, stream) in ["s-8", "s-9"].into_iter().enumerate() {
        let store = store.clone();
        first.push(tokio::spawn(async move {
            store
                .append(stream, ExpectedVersion::NoStream, vec![event(0)])
                .await
        }));
        lock_waiters(&pool, "custody_event_pending", n + 1).await?;
    }
    let mut queued = Vec::new();
    for i in 0..6u64 {
        let store = store.clone();
        let (stream, expected) = if i < 3 {
            ("s-0".to_owned(), ExpectedVersion::NoStream)
        } else {
            (format!("s-{i}"), ExpectedVersion::NoStream)
        };
        queued.push(tokio::spawn(async move {
            store.append(&stream, expected, vec![event(i)]).await
        }));
    }
    wait_queued(&store, 6).await?;
    let busy = store.write_stats();
    ensure!(busy.queued == 6 && busy.running == 2, "{busy:?}");
    blocker.rollback().await?;

    for f in first {
        ensure!(appended(&f.await??)? == 1);
    }
    let mut wins = 0;
    for (i, q) in queued.into_iter().enumerate() {
        let out = q.await??;
        if i < 3 {
            match out {
                AppendOutcome::Appended(a) if a.version == 1 => wins += 1,
                AppendOutcome::WrongVersion {
                    actual: Some(1), ..
                } => {}
                other => bail!("append {i} on s-0: {other:?}"),
            }
        } else {
            ensure!(appended(&out)? == 1, "append {i}: {out:?}");
        }
    }
    ensure!(wins == 1, "{wins} winners of NoStream");
    let stats = store.write_stats();
    ensure!(
        stats.transactions == 3 && stats.largest_batch == 6 && stats.writes == 8,
        "{stats:?}"
    );
    Ok(())
}

/// A combined transaction that fails (one append reuses a stored event id)
/// is rolled back and its appends run one by one: the bad one gets its
/// error, the others are written.
#[tokio::test]
async fn a_failing_combined_append_is_retried_alone() -> anyhow::Result<()> {
    let Some((_db, pool)) = common::db().await? else {
        return Ok(());
    };
    let store = PgEventStore::new(pool.clone());
    let used = event(0);
    appended(
        &store
            .append("s-0", ExpectedVersion::NoStream, vec![used.clone()])
            .await?,
    )?;
    let mut blocker = pool.begin().await?;
    sqlx::query("LOCK TABLE custody_event_pending IN EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await?;
    // both combiner tasks busy, so the next three go in one transaction
    let mut first = Vec::new();
    for (n, stream) in ["s-1", "s-5"].into_iter().enumerate() {
        let store = store.clone();
        first.push(tokio::spawn(async move {
            store
                .append(stream, ExpectedVersion::NoStream, vec![event(1)])
                .await
        }));
        lock_waiters(&pool, "custody_event_pending", n + 1).await?;
    }
    let mut queued = Vec::new();
    for i in 2..5u64 {
        let store = store.clone();
        let e = if i == 3 { used.clone() } else { event(i) };
        queued.push(tokio::spawn(async move {
            store
                .append(&format!("s-{i}"), ExpectedVersion::NoStream, vec![e])
                .await
        }));
    }
    wait_queued(&store, 3).await?;
    blocker.rollback().await?;
    for f in first {
        appended(&f.await??)?;
    }
    for (i, q) in (2..5).zip(queued) {
        let out = q.await?;
        if i == 3 {
            let err = out.err().context("the reused id must be refused")?;
            ensure!(err.to_string().contains("s-0"), "{err}");
        } else {
            ensure!(appended(&out?)? == 1);
        }
    }
    ensure!(
        store.stream_info("s-3").await?.is_none(),
        "nothing of s-3 stays"
    );
    Ok(())
}

/// append_in joins the caller's transaction: a rollback leaves neither the
/// event nor the outbox message, a commit both.
#[tokio::test]
async fn append_in_commits_and_rolls_back_with_the_callers_transaction() -> anyhow::Result<()> {
    let Some((_db, pool)) = common::db().await? else {
        return Ok(());
    };
    let store = PgEventStore::new(pool.clone());
    let outbox = PgOutbox::new(pool.clone());
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await }
    };

    let mut tx = pool.begin().await?;
    let e = event(1);
    appended(
        &store
            .append_in(
                &mut tx,
                "order-1",
                ExpectedVersion::NoStream,
                vec![e.clone()],
            )
            .await?,
    )?;
    outbox
        .enqueue(&mut tx, &common::msg("orders", "order-1", 1))
        .await?;
    tx.rollback().await?;
    ensure!(count("SELECT count(*) FROM custody_events").await? == 0);
    ensure!(count("SELECT count(*) FROM custody_outbox").await? == 0);
    ensure!(store.stream_info("order-1").await?.is_none());
    ensure!(store
        .read_all(0, &LogFilter::all(), 10)
        .await?
        .events
        .is_empty());

    let mut tx = pool.begin().await?;
    appended(
        &store
            .append_in(
                &mut tx,
                "order-1",
                ExpectedVersion::NoStream,
                vec![e.clone()],
            )
            .await?,
    )?;
    outbox
        .enqueue(&mut tx, &common::msg("orders", "order-1", 1))
        .await?;
    tx.commit().await?;
    ensure!(count("SELECT count(*) FROM custody_outbox").await? == 1);
    let slice = store.read_all(0, &LogFilter::all(), 10).await?;
    ensure!(
        slice.events.len() == 1 && slice.events[0].id == e.id,
        "{slice:?}"
    );
    // a retry in a new transaction is idempotent
    let mut tx = pool.begin().await?;
    let again = store
        .append_in(
            &mut tx,
            "order-1",
            ExpectedVersion::NoStream,
            vec![e.clone()],
        )
        .await?;
    tx.commit().await?;
    ensure!(again.appended().is_some_and(|a| a.idempotent), "{again:?}");
    Ok(())
}

fn course_query(course: &str) -> Query {
    Query {
        items: vec![QueryItem {
            types: vec!["Enrolled".into()],
            tags: vec![course.into()],
        }],
    }
}

/// The append condition: a matching event after `after` fails it (with its
/// position, also when it was not sequenced yet), one at or before passes,
/// a non-matching one never fails it.
#[tokio::test]
async fn append_if_fails_on_a_matching_event_after_its_position() -> anyhow::Result<()> {
    let Some((_db, pool)) = common::db().await? else {
        return Ok(());
    };
    let store = PgEventStore::new(pool.clone());
    let cond = |after| AppendCondition {
        query: course_query("course:1"),
        after,
    };
    let first = store
        .append_if(
            "c-1",
            &cond(0),
            vec![tagged("Enrolled", &["course:1", "student:1"])],
        )
        .await?;
    appended(&first)?;
    // read_query gives the decision's position
    let decided = store.read_query(&cond(0).query, 0, 10).await?;
    ensure!(
        decided.events.len() == 1 && decided.head == 1,
        "{decided:?}"
    );
    let stale = store
        .append_if(
            "c-1",
            &cond(0),
            vec![tagged("Enrolled", &["course:1", "student:2"])],
        )
        .await?;
    ensure!(
        stale == AppendOutcome::ConditionFailed { position: 1 },
        "{stale:?}"
    );
    appended(
        &store
            .append_if(
                "c-1",
                &cond(1),
                vec![tagged("Enrolled", &["course:1", "student:2"])],
            )
            .await?,
    )?;
    // other courses and other types do not touch course 1's condition
    store
        .append(
            "c-2",
            ExpectedVersion::Any,
            vec![tagged("Enrolled", &["course:2"])],
        )
        .await?;
    store
        .append(
            "c-1x",
            ExpectedVersion::Any,
            vec![tagged("Left", &["course:1"])],
        )
        .await?;
    let head = store.head().await?;
    appended(
        &store
            .append_if(
                "c-1",
                &cond(2),
                vec![tagged("Enrolled", &["course:1", "student:3"])],
            )
            .await?,
    )?;
    // committed, not yet sequenced (no reader ran since): the conditional
    // append numbers it first and names its position
    let last = tagged("Enrolled", &["course:1"]);
    store
        .append("c-1y", ExpectedVersion::Any, vec![last.clone()])
        .await?;
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM custody_event_pending")
        .fetch_one(&pool)
        .await?;
    ensure!(
        pending == 2,
        "the last two appends are not sequenced yet ({pending})"
    );
    let stale = store
        .append_if(
            "c-1",
            &cond(head + 1),
            vec![tagged("Enrolled", &["course:1"])],
        )
        .await?;
    ensure!(
        stale == AppendOutcome::ConditionFailed { position: head + 2 },
        "{stale:?}"
    );
    Ok(())
}

/// A conditional append whose query matches what an open transaction is
/// writing waits for it, then fails with position 0 (committed after the
/// conditional append looked at positions, not numbered yet); a query that
/// does not match does not fail.
#[tokio::test]
async fn append_if_waits_for_a_concurrent_matching_append_and_fails() -> anyhow::Result<()> {
    let Some((_db, pool)) = common::db().await? else {
        return Ok(());
    };
    let store = PgEventStore::new(pool.clone());
    let mut open = pool.begin().await?;
    appended(
        &store
            .append_in(
                &mut open,
                "c-9",
                ExpectedVersion::Any,
                vec![tagged("Enrolled", &["course:9", "student:1"])],
            )
            .await?,
    )?;
    let racing = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .append_if(
                    "c-9",
                    &AppendCondition {
                        query: course_query("course:9"),
                        after: 0,
                    },
                    vec![tagged("Enrolled", &["course:9", "student:2"])],
                )
                .await
        }
    });
    // it waits on the open transaction's bucket lock (an advisory lock)
    lock_waiter(&pool, "pg_advisory_xact_lock").await?;
    ensure!(!racing.is_finished(), "the conditional append must wait");
    open.commit().await?;
    let out = tokio::time::timeout(Duration::from_secs(10), racing).await???;
    ensure!(
        out == AppendOutcome::ConditionFailed { position: 0 },
        "it must see the committed match, not yet numbered: {out:?}"
    );

    // two conditions that do not overlap both pass
    let a = store
        .append_if(
            "c-10",
            &AppendCondition {
                query: course_query("course:10"),
                after: 0,
            },
            vec![tagged("Enrolled", &["course:10"])],
        )
        .await?;
    let b = store
        .append_if(
            "c-11",
            &AppendCondition {
                query: course_query("course:11"),
                after: 0,
            },
            vec![tagged("Enrolled", &["course:11"])],
        )
        .await?;
    appended(&a)?;
    appended(&b)?;
    Ok(())
}

/// wait_for_head wakes on an append from another store handle (NOTIFY),
/// well before its timeout, and returns the new head.
#[tokio::test]
async fn wait_for_head_wakes_on_an_append() -> anyhow::Result<()> {
    let Some((_db, pool)) = common::db().await? else {
        return Ok(());
    };
    let reader = PgEventStore::new(pool.clone()).with_poll_interval(Duration::from_secs(60));
    let writer = PgEventStore::new(pool.clone());
    ensure!(reader.wait_for_head(0, Duration::from_millis(50)).await? == 0);
    let waiting = tokio::spawn({
        let reader = reader.clone();
        async move { reader.wait_for_head(0, Duration::from_secs(30)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    writer
        .append("x-1", ExpectedVersion::Any, vec![event(1)])
        .await?;
    let head = tokio::time::timeout(Duration::from_secs(10), waiting).await???;
    ensure!(head == 1, "{head}");
    Ok(())
}

/// A refused append removes only a stream row it created for nothing: a
/// stream written earlier in the same transaction, or one holding metadata,
/// stays as it was.
#[tokio::test]
async fn a_refused_append_keeps_stream_rows_that_hold_something() -> anyhow::Result<()> {
    let Some((_db, pool)) = common::db().await? else {
        return Ok(());
    };
    let store = PgEventStore::new(pool.clone());
    let mut tx = pool.begin().await?;
    appended(
        &store
            .append_in(
                &mut tx,
                "twice-1",
                ExpectedVersion::NoStream,
                vec![event(1)],
            )
            .await?,
    )?;
    let refused = store
        .append_in(
            &mut tx,
            "twice-1",
            ExpectedVersion::NoStream,
            vec![event(2)],
        )
        .await?;
    ensure!(
        refused
            == AppendOutcome::WrongVersion {
                expected: ExpectedVersion::NoStream,
                actual: Some(1)
            },
        "{refused:?}"
    );
    tx.commit().await?;
    let info = store
        .stream_info("twice-1")
        .await?
        .context("twice-1 stays")?;
    ensure!(info.version == 1, "{info:?}");

    let meta = custody_core::event::StreamMetadata {
        custom: Some(serde_json::json!({ "owner": "billing" })),
        ..Default::default()
    };
    store.set_metadata("meta-1", &meta).await?;
    let refused = store
        .append("meta-1", ExpectedVersion::Exact(3), vec![event(3)])
        .await?;
    ensure!(
        matches!(refused, AppendOutcome::WrongVersion { actual: None, .. }),
        "{refused:?}"
    );
    let info = store.stream_info("meta-1").await?.context("meta-1 stays")?;
    ensure!(info.metadata == meta && info.version == 0, "{info:?}");
    Ok(())
}
