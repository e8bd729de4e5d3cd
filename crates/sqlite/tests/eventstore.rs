//! The event store on SQLite: the conformance suite
//! (custody_testkit::conformance::eventstore) on a fresh database file, and
//! what only SQLite has (append_in joining the caller's transaction, write
//! combining).

use std::time::Duration;

use custody_core::event::{
    AppendOutcome, Direction, EventData, EventStore, ExpectedVersion, LogFilter,
};
use custody_core::Message;
use custody_sqlite::{SqliteEventStore, SqliteOutbox};
use custody_testkit::conformance::eventstore::{event, EventStoreFixture};
use sqlx::Connection;
use sqlx::SqlitePool;
use tempfile::TempDir;

/// A fresh custody database file with an event store on it.
struct SqliteFixture {
    _dir: TempDir,
    pool: SqlitePool,
    store: SqliteEventStore,
}

impl SqliteFixture {
    async fn create() -> anyhow::Result<SqliteFixture> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("custody.db").to_string_lossy().into_owned();
        let pool = custody_sqlite::connect(&path).await?;
        custody_sqlite::migrate(&pool).await?;
        Ok(SqliteFixture {
            store: SqliteEventStore::new(pool.clone()),
            pool,
            _dir: dir,
        })
    }
}

impl EventStoreFixture for SqliteFixture {
    type Store = SqliteEventStore;

    async fn fresh() -> anyhow::Result<Option<Self>> {
        Ok(Some(SqliteFixture::create().await?))
    }

    fn store(&self) -> SqliteEventStore {
        self.store.clone()
    }
}

custody_testkit::eventstore_conformance!(SqliteFixture);

/// The same suite with write combining off: every append its own transaction.
struct Uncombined(SqliteFixture);

impl EventStoreFixture for Uncombined {
    type Store = SqliteEventStore;

    async fn fresh() -> anyhow::Result<Option<Self>> {
        let mut f = SqliteFixture::create().await?;
        f.store = f.store.with_write_combining(false);
        Ok(Some(Uncombined(f)))
    }

    fn store(&self) -> SqliteEventStore {
        self.0.store.clone()
    }
}

mod uncombined {
    use super::Uncombined;
    custody_testkit::eventstore_conformance!(Uncombined);
}

/// A JSON message on `orders` keyed by `key` (`created_at` cut to the
/// millisecond, as stored).
fn message(key: &str) -> anyhow::Result<Message> {
    use chrono::SubsecRound;
    Ok(Message::builder("orders", key, "OrderPlaced")
        .created_at(chrono::Utc::now().trunc_subsecs(3))
        .json(&1)?
        .build()?)
}

async fn count(pool: &SqlitePool, table: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await?)
}

/// `append_in` joins the caller's transaction: business row, events and
/// outbox message commit together, and a rollback leaves none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_in_commits_and_rolls_back_with_the_callers_transaction() -> anyhow::Result<()> {
    let f = SqliteFixture::create().await?;
    let outbox = SqliteOutbox::new(f.pool.clone());
    sqlx::query("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
        .execute(&f.pool)
        .await?;

    let mut tx = f.pool.begin().await?;
    sqlx::query("INSERT INTO orders (id) VALUES (1)")
        .execute(&mut *tx)
        .await?;
    let out = f
        .store
        .append_in(
            &mut tx,
            "order-1",
            ExpectedVersion::NoStream,
            vec![event("OrderPlaced", 1)?, event("OrderPaid", 2)?],
        )
        .await?;
    anyhow::ensure!(out.appended().is_some_and(|a| a.version == 2), "{out:?}");
    outbox.enqueue(&mut tx, &message("order-1")?).await?;
    tx.commit().await?;
    anyhow::ensure!(count(&f.pool, "orders").await? == 1);
    anyhow::ensure!(count(&f.pool, "custody_outbox").await? == 1);
    anyhow::ensure!(f.store.head().await? == 2);

    let mut tx = f.pool.begin().await?;
    sqlx::query("INSERT INTO orders (id) VALUES (2)")
        .execute(&mut *tx)
        .await?;
    let out = f
        .store
        .append_in(
            &mut tx,
            "order-2",
            ExpectedVersion::NoStream,
            vec![event("OrderPlaced", 3)?.tag("customer:1")],
        )
        .await?;
    anyhow::ensure!(out.appended().is_some(), "{out:?}");
    outbox.enqueue(&mut tx, &message("order-2")?).await?;
    tx.rollback().await?;
    anyhow::ensure!(count(&f.pool, "orders").await? == 1, "business row kept");
    anyhow::ensure!(count(&f.pool, "custody_outbox").await? == 1, "message kept");
    anyhow::ensure!(count(&f.pool, "custody_event_tags").await? == 0, "tag kept");
    anyhow::ensure!(f.store.head().await? == 2, "event kept");
    anyhow::ensure!(f.store.stream_info("order-2").await?.is_none());
    let all = f.store.read_all(0, &LogFilter::all(), 10).await?;
    anyhow::ensure!(all.events.len() == 2);
    Ok(())
}

/// A refused `append_in` leaves nothing of itself in the caller's
/// transaction, which can still commit its own rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_append_in_leaves_the_transaction_usable() -> anyhow::Result<()> {
    let f = SqliteFixture::create().await?;
    f.store
        .append("order-1", ExpectedVersion::Any, vec![event("E", 1)?])
        .await?;
    let mut tx = f.pool.begin_with("BEGIN IMMEDIATE").await?;
    let ok = f
        .store
        .append_in(
            &mut tx,
            "order-1",
            ExpectedVersion::Exact(1),
            vec![event("E", 2)?],
        )
        .await?;
    anyhow::ensure!(ok.appended().is_some(), "{ok:?}");
    // 300 events, the last a reused id: the store inserts them in chunks,
    // so the first chunks are in before the last one fails; the whole
    // append is refused and nothing of it stays in the transaction
    let reused = f
        .store
        .read_stream("order-1", Direction::Forward, 1, 1)
        .await?
        .events[0]
        .id;
    let mut batch = (3..302)
        .map(|n| event("E", n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    batch.push(EventData::json("E", &4)?.id(reused));
    let refused = f
        .store
        .append_in(&mut tx, "order-1", ExpectedVersion::Exact(2), batch)
        .await?;
    anyhow::ensure!(
        matches!(
            refused,
            AppendOutcome::WrongVersion {
                actual: Some(2),
                ..
            }
        ),
        "{refused:?}"
    );
    tx.commit().await?;
    let read = f
        .store
        .read_stream("order-1", Direction::Forward, 1, 10)
        .await?;
    anyhow::ensure!(
        read.version == Some(2) && read.events.len() == 2,
        "{read:?}"
    );
    Ok(())
}

/// Concurrent appends through one store are combined: fewer transactions
/// than appends, a batch larger than one; with combining off every append
/// is its own transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_combining_combines_concurrent_appends() -> anyhow::Result<()> {
    async fn run(store: SqliteEventStore) -> anyhow::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..8u64 {
            let store = store.clone();
            tasks.spawn(async move {
                for n in 0..50u64 {
                    let out = store
                        .append(
                            &format!("writer-{w}"),
                            ExpectedVersion::Exact(n),
                            vec![event("E", n)?],
                        )
                        .await?;
                    anyhow::ensure!(out.appended().is_some(), "{out:?}");
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        anyhow::ensure!(store.head().await? == 400);
        Ok(())
    }
    let combined = SqliteFixture::create().await?;
    run(combined.store.clone()).await?;
    let stats = combined.store.write_stats();
    anyhow::ensure!(stats.writes == 400, "{stats:?}");
    anyhow::ensure!(
        stats.transactions < stats.writes && stats.largest_batch > 1,
        "8 concurrent appenders were not combined: {stats:?}"
    );

    let alone = SqliteFixture::create().await?;
    let store = alone.store.clone().with_write_combining(false);
    run(store.clone()).await?;
    let stats = store.write_stats();
    anyhow::ensure!(
        stats.writes == 400 && stats.transactions == 400 && stats.largest_batch == 1,
        "{stats:?}"
    );
    Ok(())
}

/// In one combined transaction each append is checked on its own: a
/// conflict refuses that append only. The batch is made by holding
/// SQLite's write lock from another connection while the appends queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_in_a_combined_batch_fails_only_that_append() -> anyhow::Result<()> {
    let f = SqliteFixture::create().await?;
    let path = f._dir.path().join("custody.db");
    let mut locker =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await?;
    sqlx::query("BEGIN EXCLUSIVE").execute(&mut locker).await?;

    let spawn = |stream: &'static str, expected: ExpectedVersion, n: u64| {
        let store = f.store.clone();
        tokio::spawn(async move {
            store
                .append(stream, expected, vec![event("E", n)?])
                .await
                .map_err(anyhow::Error::from)
        })
    };
    // the first write takes the combiner into BEGIN IMMEDIATE, which waits
    // for the lock; the next three queue behind it and form one batch
    let first = spawn("warmup", ExpectedVersion::Any, 0);
    wait_until(|| f.store.write_stats().running == 1).await?;
    let b = spawn("acct-1", ExpectedVersion::NoStream, 1);
    let c = spawn("acct-1", ExpectedVersion::NoStream, 2);
    let d = spawn("acct-2", ExpectedVersion::NoStream, 3);
    wait_until(|| f.store.write_stats().queued == 3).await?;
    sqlx::query("COMMIT").execute(&mut locker).await?;

    first.await??;
    let (b, c, d) = (b.await??, c.await??, d.await??);
    let wins = [&b, &c].iter().filter(|o| o.appended().is_some()).count();
    anyhow::ensure!(wins == 1, "b {b:?} c {c:?}");
    anyhow::ensure!(
        [&b, &c].iter().any(|o| matches!(
            o,
            AppendOutcome::WrongVersion {
                actual: Some(1),
                ..
            }
        )),
        "b {b:?} c {c:?}"
    );
    anyhow::ensure!(d.appended().is_some(), "{d:?}");
    let stats = f.store.write_stats();
    anyhow::ensure!(stats.largest_batch == 3, "{stats:?}");
    anyhow::ensure!(f.store.head().await? == 3);
    Ok(())
}

/// Poll `cond` every 5 ms for at most 30 s.
async fn wait_until(mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The number of alive tasks once it has not changed for 20 looks 10 ms
/// apart (at most 30 s).
async fn settled(metrics: &tokio::runtime::RuntimeMetrics) -> anyhow::Result<usize> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (mut last, mut same) = (metrics.num_alive_tasks(), 0);
    while same < 20 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "task count never settled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = metrics.num_alive_tasks();
        if now == last {
            same += 1;
        } else {
            (last, same) = (now, 0);
        }
    }
    Ok(last)
}

/// The combining task ends when the last handle is dropped, and when its
/// shutdown token is cancelled (appends then run alone).
#[tokio::test(flavor = "current_thread")]
async fn the_combining_task_stops_with_the_store() -> anyhow::Result<()> {
    let metrics = tokio::runtime::Handle::current().metrics();
    let f = SqliteFixture::create().await?;
    // sqlx runs short tasks that return connections to the pool: count
    // only when no task is left
    // sqlx runs short tasks that return connections to the pool: the
    // baseline is the count once it has stopped changing
    let before = settled(&metrics).await?;
    let store = f.store.clone();
    store
        .append("s-1", ExpectedVersion::Any, vec![event("E", 0)?])
        .await?;
    wait_until(|| metrics.num_alive_tasks() == before + 1).await?;
    drop(store);
    drop(f.store);
    wait_until(|| metrics.num_alive_tasks() == before).await?;

    let token = tokio_util::sync::CancellationToken::new();
    let store = SqliteEventStore::new(f.pool.clone()).with_shutdown(token.clone());
    store
        .append("s-1", ExpectedVersion::Exact(1), vec![event("E", 1)?])
        .await?;
    wait_until(|| metrics.num_alive_tasks() == before + 1).await?;
    token.cancel();
    wait_until(|| metrics.num_alive_tasks() == before).await?;
    let out = store
        .append("s-1", ExpectedVersion::Exact(2), vec![event("E", 2)?])
        .await?;
    anyhow::ensure!(out.appended().is_some_and(|a| a.version == 3), "{out:?}");
    Ok(())
}

/// Another process writing the same file (here: another pool and store)
/// wakes `wait_for_head` through polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_head_sees_other_writers_by_polling() -> anyhow::Result<()> {
    let f = SqliteFixture::create().await?;
    let path = f._dir.path().join("custody.db");
    let other_pool = custody_sqlite::connect(&path.to_string_lossy()).await?;
    let other = SqliteEventStore::new(other_pool);
    let store = f
        .store
        .clone()
        .with_poll_interval(Duration::from_millis(20));
    let waiter = tokio::spawn(async move { store.wait_for_head(0, Duration::from_secs(30)).await });
    other
        .append("x-1", ExpectedVersion::Any, vec![event("E", 0)?])
        .await?;
    let head = tokio::time::timeout(Duration::from_secs(30), waiter).await???;
    anyhow::ensure!(head == 1, "head {head}");
    Ok(())
}
