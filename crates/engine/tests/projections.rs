//! Subscriptions and CQRS projections on the real stores: SQLite
//! (`SqliteEventStore`, read model in another SQLite file) and PostgreSQL
//! (`PgEventStore`; read model in the same database, and a read model in
//! SQLite fed from PostgreSQL).
//!
//! The read model of [`Counter`] counts how many times each event was
//! applied (`applied.times`), so a double apply shows as a 2.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use custody_core::event::{EventData, EventStore, ExpectedVersion, LogFilter, RecordedEvent};
use custody_core::projection::{ProjectionAdmin, ProjectionStore, Request, Tables};
use custody_core::HandlerError;
use custody_engine::projection::{Projection, ProjectionConfig, ProjectionRunner};
use custody_engine::subscription::{Subscription, SubscriptionConfig};
use custody_engine::LeaseConfig;
use custody_postgres::{PgEventStore, PgInbox, PgProjectionAdmin};
use custody_sqlite::{SqliteEventStore, SqliteInbox, SqliteProjectionAdmin};
use custody_testkit::process::{poll_until, Proc};
use sqlx::{PgPool, SqlitePool};
use tempfile::TempDir;

const WITHIN: Duration = Duration::from_secs(120);
const EVERY: Duration = Duration::from_millis(50);

/// Counts applications per event id and totals per stream. Fails
/// permanently on `Poison` events until `fixed`; sleeps `slow` per event in
/// the position range `slow_in` and prints `mid <position>` at `mid`.
#[derive(Clone, Default)]
struct Counter {
    version: u32,
    fixed: Arc<AtomicBool>,
    slow_in: Option<(u64, u64)>,
    mid: Option<u64>,
}

impl Counter {
    fn v(version: u32) -> Self {
        Counter {
            version,
            ..Counter::default()
        }
    }

    fn check(&self, event: &RecordedEvent) -> Result<i64, HandlerError> {
        if event.event_type == "Poison" && !self.fixed.load(Ordering::SeqCst) {
            return Err(HandlerError::permanent(format!(
                "poison event {} cannot be applied",
                event.position
            )));
        }
        let v: serde_json::Value = event.decode_json()?;
        Ok(v["n"].as_i64().unwrap_or(0))
    }

    async fn pace(&self, event: &RecordedEvent) {
        if Some(event.position) == self.mid {
            println!("mid {}", event.position);
        }
        if let Some((from, to)) = self.slow_in {
            if (from..=to).contains(&event.position) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

const TABLE_DDL: [&str; 2] = [
    "CREATE TABLE {applied} (event_id TEXT PRIMARY KEY, position BIGINT NOT NULL, times BIGINT NOT NULL)",
    "CREATE TABLE {totals} (stream TEXT PRIMARY KEY, n BIGINT NOT NULL, total BIGINT NOT NULL)",
];

/// The same projection on each backend's transaction type.
macro_rules! counter_for {
    ($store:ty, $db:ty) => {
        impl Projection<$store> for Counter {
            fn name(&self) -> &str {
                "counter"
            }
            fn version(&self) -> u32 {
                self.version
            }
            fn filter(&self) -> LogFilter {
                LogFilter::all()
            }
            fn tables(&self) -> Vec<String> {
                vec!["applied".into(), "totals".into()]
            }
            async fn setup(
                &self,
                tx: &mut sqlx::Transaction<'static, $db>,
                tables: &Tables,
            ) -> Result<(), HandlerError> {
                for ddl in TABLE_DDL {
                    let ddl = ddl
                        .replace("{applied}", &tables.name("applied"))
                        .replace("{totals}", &tables.name("totals"));
                    sqlx::query(&ddl)
                        .execute(&mut **tx)
                        .await
                        .map_err(HandlerError::transient)?;
                }
                Ok(())
            }
            async fn apply(
                &self,
                tx: &mut sqlx::Transaction<'static, $db>,
                tables: &Tables,
                event: &RecordedEvent,
            ) -> Result<(), HandlerError> {
                let n = self.check(event)?;
                self.pace(event).await;
                let applied = tables.name("applied");
                let totals = tables.name("totals");
                let id = event.id.to_string();
                let again = sqlx::query(&format!(
                    "UPDATE {applied} SET times = times + 1 WHERE event_id = $1"
                ))
                .bind(&id)
                .execute(&mut **tx)
                .await
                .map_err(HandlerError::transient)?;
                if again.rows_affected() == 0 {
                    sqlx::query(&format!(
                        "INSERT INTO {applied} (event_id, position, times) VALUES ($1, $2, 1)"
                    ))
                    .bind(&id)
                    .bind(event.position as i64)
                    .execute(&mut **tx)
                    .await
                    .map_err(HandlerError::transient)?;
                }
                let seen = sqlx::query(&format!(
                    "UPDATE {totals} SET n = n + 1, total = total + $2 WHERE stream = $1"
                ))
                .bind(&event.stream)
                .bind(n)
                .execute(&mut **tx)
                .await
                .map_err(HandlerError::transient)?;
                if seen.rows_affected() == 0 {
                    sqlx::query(&format!(
                        "INSERT INTO {totals} (stream, n, total) VALUES ($1, 1, $2)"
                    ))
                    .bind(&event.stream)
                    .bind(n)
                    .execute(&mut **tx)
                    .await
                    .map_err(HandlerError::transient)?;
                }
                Ok(())
            }
        }
    };
}

counter_for!(SqliteInbox, sqlx::Sqlite);
counter_for!(PgInbox, sqlx::Postgres);

/// The read model's database, for the test's own reads.
#[derive(Clone)]
enum ReadModel {
    Sqlite(SqlitePool),
    Pg(PgPool),
}

type Applied = BTreeMap<u64, i64>;

impl ReadModel {
    /// position → times applied, through the view readers use.
    async fn applied(&self) -> anyhow::Result<Applied> {
        const Q: &str = "SELECT position, times FROM applied";
        let rows: Vec<(i64, i64)> = match self {
            ReadModel::Sqlite(p) => sqlx::query_as(Q).fetch_all(p).await?,
            ReadModel::Pg(p) => sqlx::query_as(Q).fetch_all(p).await?,
        };
        Ok(rows.into_iter().map(|(p, t)| (p as u64, t)).collect())
    }

    /// stream → (events, sum of n), through the view.
    async fn totals(&self) -> anyhow::Result<BTreeMap<String, (i64, i64)>> {
        const Q: &str = "SELECT stream, n, total FROM totals";
        let rows: Vec<(String, i64, i64)> = match self {
            ReadModel::Sqlite(p) => sqlx::query_as(Q).fetch_all(p).await?,
            ReadModel::Pg(p) => sqlx::query_as(Q).fetch_all(p).await?,
        };
        Ok(rows.into_iter().map(|(s, n, t)| (s, (n, t))).collect())
    }

    /// The active generation's checkpoint, from the database.
    async fn checkpoint(&self) -> anyhow::Result<u64> {
        const Q: &str = "SELECT COALESCE(MAX(g.checkpoint), 0) FROM custody_projection p \
             JOIN custody_projection_generation g ON g.name = p.name AND g.generation = p.active \
             WHERE p.name = 'counter'";
        let v: i64 = match self {
            ReadModel::Sqlite(p) => sqlx::query_scalar(Q).fetch_one(p).await?,
            ReadModel::Pg(p) => sqlx::query_scalar(Q).fetch_one(p).await?,
        };
        Ok(v as u64)
    }
}

fn config(holder: &str) -> ProjectionConfig {
    ProjectionConfig {
        batch_size: 100,
        lease: LeaseConfig {
            holder: holder.to_owned(),
            ttl: Duration::from_secs(2),
            renew_interval: Duration::from_millis(300),
        },
        idle_wait: Duration::from_millis(100),
        ..ProjectionConfig::default()
    }
}

/// Append `count` events `Added {n}` over `streams` streams, `per` per
/// append; returns the head.
async fn append<E: EventStore>(
    events: &E,
    prefix: &str,
    streams: usize,
    count: usize,
    per: usize,
) -> anyhow::Result<u64> {
    let mut done = 0;
    let mut k = 0;
    while done < count {
        let n = per.min(count - done);
        let batch = (0..n)
            .map(|i| EventData::json("Added", &serde_json::json!({ "n": done + i })))
            .collect::<Result<Vec<_>, _>>()?;
        let stream = format!("{prefix}-{}", k % streams);
        let outcome = events.append(&stream, ExpectedVersion::Any, batch).await?;
        ensure!(outcome.appended().is_some(), "append refused: {outcome:?}");
        done += n;
        k += 1;
    }
    Ok(events.head().await?)
}

/// What a fresh build gives: stream → (events, sum of n) over the whole log.
async fn fresh_build<E: EventStore>(events: &E) -> anyhow::Result<BTreeMap<String, (i64, i64)>> {
    let mut out: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut after = 0;
    loop {
        let slice = events.read_all(after, &LogFilter::all(), 5000).await?;
        for e in &slice.events {
            let v: serde_json::Value = e.decode_json()?;
            let entry = out.entry(e.stream.clone()).or_default();
            entry.0 += 1;
            entry.1 += v["n"].as_i64().unwrap_or(0);
        }
        if slice.scanned_to >= slice.head {
            return Ok(out);
        }
        after = slice.scanned_to;
    }
}

/// Wait (bounded) until the active generation's checkpoint reaches `head`.
async fn caught_up(read: &ReadModel, head: u64) -> anyhow::Result<()> {
    let cp = poll_until(WITHIN, EVERY, || read.checkpoint(), |c| *c >= head).await?;
    ensure!(cp >= head, "the projection stopped at {cp} of {head}");
    Ok(())
}

fn all_once(applied: &Applied, head: u64) -> bool {
    applied.len() as u64 == head && applied.values().all(|t| *t == 1)
}

// ---------------------------------------------------------------- fixtures

struct SqliteDbs {
    _dir: TempDir,
    events_url: String,
    read_url: String,
    events: SqliteEventStore,
    read: SqlitePool,
}

async fn sqlite() -> anyhow::Result<SqliteDbs> {
    let dir = tempfile::tempdir()?;
    let events_url = dir.path().join("events.db").to_string_lossy().into_owned();
    let read_url = dir.path().join("read.db").to_string_lossy().into_owned();
    let events_pool = custody_sqlite::connect(&events_url).await?;
    custody_sqlite::migrate(&events_pool).await?;
    let read = custody_sqlite::connect(&read_url).await?;
    custody_sqlite::migrate(&read).await?;
    Ok(SqliteDbs {
        _dir: dir,
        events_url,
        read_url,
        events: SqliteEventStore::new(events_pool),
        read,
    })
}

async fn pg() -> anyhow::Result<Option<(custody_testkit::PgTestDb, PgPool)>> {
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(None);
    };
    let pool = custody_postgres::connect(&db.url).await?;
    custody_postgres::migrate(&pool).await?;
    Ok(Some((db, pool)))
}

// --------------------------------------------------------------- scenarios

/// 100,000 events (or `count`): the subscription delivers all in order,
/// then events appended during and after the catch-up, without a gap or a
/// duplicate.
async fn subscription_scenario<E: EventStore>(events: E, count: usize) -> anyhow::Result<()> {
    let head = append(&events, "bulk", 50, count, 1000).await?;
    ensure!(head as usize == count, "head {head} after {count} events");
    let mut sub = Subscription::start(
        events.clone(),
        0,
        LogFilter::all(),
        SubscriptionConfig {
            page_size: 2000,
            buffer: 2,
            live_wait: Duration::from_millis(500),
            ..SubscriptionConfig::default()
        },
    );
    // appends racing the catch-up, and more once it is live
    let appender = {
        let events = events.clone();
        tokio::spawn(async move { append(&events, "late", 7, 3000, 3).await })
    };
    let total = count + 3000;
    let mut seen = HashSet::new();
    let mut last = 0u64;
    let mut caught_up_before_end = false;
    let collect = async {
        while seen.len() < total {
            let page = sub.next().await.context("subscription ended early")??;
            for e in &page.events {
                ensure!(e.position > last, "position {} after {last}", e.position);
                last = e.position;
                ensure!(seen.insert(e.id), "event {} delivered twice", e.id);
            }
            if page.caught_up() && seen.len() < total {
                caught_up_before_end = true;
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(WITHIN, collect)
        .await
        .context("subscription did not deliver every event")??;
    appender.await??;
    ensure!(seen.len() == total, "{} of {total} events", seen.len());
    ensure!(
        last == events.head().await?,
        "last position {last} is not the head"
    );
    // nothing more than what was appended arrives
    let extra = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    ensure!(
        extra.is_err(),
        "an event beyond the appended ones: {extra:?}"
    );
    let _ = caught_up_before_end;
    Ok(())
}

/// A rebuild while events are appended and the live runner runs: readers
/// always find the read model, and the switched one equals a fresh build.
async fn rebuild_scenario<E, S>(
    events: E,
    store: S,
    read: ReadModel,
    admin: Box<dyn ProjectionAdmin>,
) -> anyhow::Result<()>
where
    E: EventStore,
    S: ProjectionStore,
    Counter: Projection<S>,
{
    append(&events, "acct", 20, 2000, 10).await?;
    let mut runner = ProjectionRunner::new(events.clone(), store.clone());
    runner.spawn(Counter::v(1), config("rebuilder"))?;
    let head = events.head().await?;
    caught_up(&read, head).await?;
    let a = read.applied().await?;
    ensure!(
        all_once(&a, head),
        "first build: {} rows for head {head}",
        a.len()
    );

    // appends keep coming; a reader keeps reading the view
    let stop = Arc::new(AtomicBool::new(false));
    let appender = {
        let (events, stop) = (events.clone(), stop.clone());
        tokio::spawn(async move {
            // a steady write rate the runner can keep up with
            while !stop.load(Ordering::SeqCst) {
                append(&events, "acct", 20, 5, 5).await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(())
        })
    };
    let reader = {
        let (read, stop) = (read.clone(), stop.clone());
        tokio::spawn(async move {
            let mut reads = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let totals = read.totals().await.context("reading the view")?;
                ensure!(
                    !totals.is_empty(),
                    "the read model was empty during the rebuild"
                );
                reads += 1;
            }
            anyhow::Ok(reads)
        })
    };
    admin.request("counter", Request::Rebuild).await?;
    let status = poll_until(
        WITHIN,
        EVERY,
        || async { Ok(admin.status(Some("counter")).await?) },
        |s| s[0].active.generation == 2 && s[0].rebuild.is_none() && s[0].request.is_none(),
    )
    .await?;
    ensure!(status[0].active.generation == 2, "not switched: {status:?}");
    stop.store(true, Ordering::SeqCst);
    appender.await??;
    let reads = reader.await??;
    ensure!(reads > 0, "the reader never read");
    let head = events.head().await?;
    caught_up(&read, head).await?;
    let a = read.applied().await?;
    ensure!(
        all_once(&a, head),
        "after the switch: {} rows for head {head}, all once: {}",
        a.len(),
        a.values().all(|t| *t == 1)
    );
    let fresh = fresh_build(&events).await?;
    ensure!(
        read.totals().await? == fresh,
        "the rebuilt read model differs from a fresh build"
    );
    // the old generation's tables are gone, the lag is 0
    let s = admin.status(Some("counter")).await?;
    ensure!(
        s[0].lag_events == 0 && s[0].lag_seconds == 0.0,
        "lag after catch-up: {s:?}"
    );
    ensure!(s[0].runner.as_deref() == Some("rebuilder"), "runner: {s:?}");
    runner.stop().await;
    Ok(())
}

/// Two runners of one projection: one active; the other takes over when it
/// stops; nothing applied twice.
async fn two_runners_scenario<E, S>(events: E, store: S, read: ReadModel) -> anyhow::Result<()>
where
    E: EventStore,
    S: ProjectionStore,
    Counter: Projection<S>,
{
    append(&events, "pair", 5, 1000, 10).await?;
    let mut a = ProjectionRunner::new(events.clone(), store.clone());
    a.spawn(Counter::v(1), config("runner-a"))?;
    let mut b = ProjectionRunner::new(events.clone(), store.clone());
    b.spawn(Counter::v(1), config("runner-b"))?;
    let active = |a: &ProjectionRunner<E, S>, b: &ProjectionRunner<E, S>| {
        (
            a.status("counter").is_some_and(|s| s.active),
            b.status("counter").is_some_and(|s| s.active),
        )
    };
    let head = events.head().await?;
    caught_up(&read, head).await?;
    let applied = read.applied().await?;
    ensure!(
        all_once(&applied, head),
        "{} rows for head {head}",
        applied.len()
    );
    // observe for a while: never both
    for _ in 0..20 {
        let (x, y) = active(&a, &b);
        ensure!(!(x && y), "both runners active");
        ensure!(x || y, "no runner active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (x, _) = active(&a, &b);
    let (first, second) = if x { (a, b) } else { (b, a) };
    first.stop().await;
    let took = poll_until(
        WITHIN,
        EVERY,
        || async { Ok(second.status("counter").is_some_and(|s| s.active)) },
        |t| *t,
    )
    .await?;
    ensure!(took, "the standby did not take over");
    append(&events, "pair", 5, 500, 10).await?;
    let head = events.head().await?;
    caught_up(&read, head).await?;
    let applied = read.applied().await?;
    ensure!(
        all_once(&applied, head),
        "after takeover: {} rows for head {head}",
        applied.len()
    );
    second.stop().await;
    Ok(())
}

// ------------------------------------------------------------------ SQLite

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_subscription_catches_up_100k_then_goes_live() -> anyhow::Result<()> {
    let dbs = sqlite().await?;
    subscription_scenario(dbs.events.clone(), 100_000).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rebuild_without_downtime_while_appending() -> anyhow::Result<()> {
    let dbs = sqlite().await?;
    rebuild_scenario(
        dbs.events.clone(),
        SqliteInbox::new(dbs.read.clone()),
        ReadModel::Sqlite(dbs.read.clone()),
        Box::new(SqliteProjectionAdmin::new(dbs.read.clone())),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_two_runners_one_active() -> anyhow::Result<()> {
    let dbs = sqlite().await?;
    two_runners_scenario(
        dbs.events.clone(),
        SqliteInbox::new(dbs.read.clone()),
        ReadModel::Sqlite(dbs.read.clone()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_lag_is_reported_and_goes_to_zero() -> anyhow::Result<()> {
    let dbs = sqlite().await?;
    let head = append(&dbs.events, "lag", 10, 3000, 50).await?;
    let mut runner = ProjectionRunner::new(dbs.events.clone(), SqliteInbox::new(dbs.read.clone()));
    let mut cfg = config("lagger");
    cfg.batch_size = 50;
    runner.spawn(Counter::v(1), cfg)?;
    let mut watch = runner.watch("counter").context("no status")?;
    let mut max_lag = 0;
    let mut max_seconds = 0.0f64;
    let done = tokio::time::timeout(WITHIN, async {
        loop {
            watch.changed().await?;
            let s = watch.borrow().clone();
            max_lag = max_lag.max(s.lag_events);
            max_seconds = max_seconds.max(s.lag_seconds);
            if s.generation.as_ref().is_some_and(|g| g.checkpoint == head) {
                return anyhow::Ok(s);
            }
        }
    })
    .await
    .context("the projection did not catch up")??;
    ensure!(max_lag > 0, "a lag was never reported while behind");
    ensure!(
        max_lag < head,
        "lag {max_lag} reported above the head {head}"
    );
    ensure!(
        done.lag_events == 0 && done.lag_seconds == 0.0,
        "lag at the head: {done:?}"
    );
    ensure!(max_seconds >= 0.0, "negative lag");
    let admin = SqliteProjectionAdmin::new(dbs.read.clone());
    let s = admin.status(Some("counter")).await?;
    ensure!(
        s[0].head == head && s[0].lag_events == 0,
        "stored status: {s:?}"
    );
    ensure!(s[0].active.checkpoint == head, "stored checkpoint: {s:?}");
    runner.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_poison_event_is_dead_lettered_and_retried() -> anyhow::Result<()> {
    let dbs = sqlite().await?;
    append(&dbs.events, "ok", 3, 250, 10).await?;
    let poison = dbs
        .events
        .append(
            "bad-1",
            ExpectedVersion::Any,
            vec![EventData::json(
                "Poison",
                &serde_json::json!({ "n": 1000 }),
            )?],
        )
        .await?;
    ensure!(poison.appended().is_some(), "{poison:?}");
    let poison_at = dbs.events.head().await?;
    append(&dbs.events, "ok", 3, 250, 10).await?;
    let head = dbs.events.head().await?;
    let counter = Counter::v(1);
    let fixed = counter.fixed.clone();
    let mut runner = ProjectionRunner::new(dbs.events.clone(), SqliteInbox::new(dbs.read.clone()));
    runner.spawn(counter, config("poisoned"))?;
    let read = ReadModel::Sqlite(dbs.read.clone());
    let cp = poll_until(WITHIN, EVERY, || read.checkpoint(), |c| *c == head).await?;
    ensure!(cp == head, "the projection stopped at {cp} of {head}");
    let applied = read.applied().await?;
    ensure!(
        applied.len() as u64 == head - 1,
        "{} applied of {}",
        applied.len(),
        head - 1
    );
    ensure!(
        !applied.contains_key(&poison_at),
        "the poison event was applied"
    );
    let admin = SqliteProjectionAdmin::new(dbs.read.clone());
    let dead = admin.dead_letters("counter").await?;
    ensure!(dead.len() == 1, "{dead:?}");
    ensure!(
        dead[0].position == poison_at && dead[0].stream == "bad-1",
        "{dead:?}"
    );
    ensure!(dead[0].reason.contains("cannot be applied"), "{dead:?}");
    ensure!(
        admin.status(Some("counter")).await?[0].dead_letters == 1,
        "status count"
    );
    // the operator fixes the projection and retries
    fixed.store(true, Ordering::SeqCst);
    ensure!(
        admin.retry("counter", Some(poison_at)).await? == 1,
        "retry marked nothing"
    );
    let left = poll_until(
        WITHIN,
        EVERY,
        || async { Ok(admin.dead_letters("counter").await?) },
        |d| d.is_empty(),
    )
    .await?;
    ensure!(left.is_empty(), "the retried dead letter stays: {left:?}");
    let applied = read.applied().await?;
    ensure!(
        all_once(&applied, head),
        "after retry: {} rows",
        applied.len()
    );
    runner.stop().await;
    Ok(())
}

/// The child of [`sqlite_runner_killed_mid_batch_resumes_exactly_once`]: a
/// projection runner as a process of its own (this test binary run again
/// with `--ignored --exact`), configured by environment variables. Run
/// directly it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of sqlite_runner_killed_mid_batch_resumes_exactly_once"]
async fn projection_child() -> anyhow::Result<()> {
    let (Ok(events_url), Ok(read_url), Ok(holder)) = (
        std::env::var("CHILD_EVENTS"),
        std::env::var("CHILD_READ"),
        std::env::var("CHILD_HOLDER"),
    ) else {
        return Ok(());
    };
    let slow: Option<u64> = std::env::var("CHILD_SLOW_FROM")
        .ok()
        .and_then(|v| v.parse().ok());
    let counter = Counter {
        slow_in: slow.map(|s| (s + 1, s + 100)),
        mid: slow.map(|s| s + 50),
        ..Counter::v(1)
    };
    let token = custody_engine::shutdown_token();
    if events_url.starts_with("postgres") {
        let events = PgEventStore::new(custody_postgres::connect(&events_url).await?);
        let read = custody_postgres::connect(&read_url).await?;
        let mut runner =
            ProjectionRunner::new(events, PgInbox::new(read)).with_token(token.clone());
        runner.spawn(counter, config(&holder))?;
        println!("child ready");
        token.cancelled().await;
        runner.stop().await;
    } else {
        let events = SqliteEventStore::new(custody_sqlite::connect(&events_url).await?);
        let read = custody_sqlite::connect(&read_url).await?;
        let mut runner =
            ProjectionRunner::new(events, SqliteInbox::new(read)).with_token(token.clone());
        runner.spawn(counter, config(&holder))?;
        println!("child ready");
        token.cancelled().await;
        runner.stop().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_runner_killed_mid_batch_resumes_exactly_once() -> anyhow::Result<()> {
    let dbs = sqlite().await?;
    let head = append(&dbs.events, "k", 10, 3000, 20).await?;
    kill_scenario(
        &dbs.events_url,
        &dbs.read_url,
        head,
        ReadModel::Sqlite(dbs.read.clone()),
        Box::new(SqliteProjectionAdmin::new(dbs.read.clone())),
    )
    .await
}

/// A runner process killed with SIGKILL while applying the middle of a
/// batch, then another one: consistent checkpoint, each event applied once.
async fn kill_scenario(
    events_url: &str,
    read_url: &str,
    head: u64,
    read: ReadModel,
    admin: Box<dyn ProjectionAdmin>,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?.to_string_lossy().into_owned();
    let args = [
        "--exact",
        "projection_child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ];

    // the first runner slows down over positions 601..=700 and is killed
    // while applying position 650: mid-batch (batches of 100 from 600)
    let mut first = Proc::start(
        "projection runner 1",
        &exe,
        &args,
        &[
            ("CHILD_EVENTS", events_url),
            ("CHILD_READ", read_url),
            ("CHILD_HOLDER", "killed-runner"),
            ("CHILD_SLOW_FROM", "600"),
        ],
    )?;
    first.wait_line("mid 650", WITHIN).await?;
    first.kill().await?;

    let checkpoint = read.checkpoint().await?;
    let applied = read.applied().await?;
    ensure!(
        checkpoint < 650,
        "the killed batch committed (checkpoint {checkpoint})"
    );
    ensure!(
        checkpoint >= 600,
        "checkpoint {checkpoint} below the batches done before"
    );
    ensure!(
        applied.len() as u64 == checkpoint && applied.keys().all(|p| *p <= checkpoint),
        "read model and checkpoint disagree after kill -9: {} rows, checkpoint {checkpoint}",
        applied.len()
    );
    ensure!(
        applied.values().all(|t| *t == 1),
        "an event applied twice before the kill"
    );

    // a second runner takes over once the dead one's lease expires
    let mut second = Proc::start(
        "projection runner 2",
        &exe,
        &args,
        &[
            ("CHILD_EVENTS", events_url),
            ("CHILD_READ", read_url),
            ("CHILD_HOLDER", "second-runner"),
        ],
    )?;
    caught_up(&read, head).await?;
    let applied = read.applied().await?;
    second.terminate().await?;
    ensure!(
        all_once(&applied, head),
        "after restart: {} rows for head {head}; twice: {:?}",
        applied.len(),
        applied
            .iter()
            .filter(|(_, t)| **t != 1)
            .take(5)
            .collect::<Vec<_>>()
    );
    ensure!(
        read.checkpoint().await? == head,
        "checkpoint is not the head"
    );
    let status = admin.status(None).await?;
    ensure!(
        status.len() == 1 && status[0].active.applied == head,
        "applied count: {status:?}"
    );
    Ok(())
}

// -------------------------------------------------------------- PostgreSQL

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_subscription_catches_up_then_goes_live() -> anyhow::Result<()> {
    let Some((_db, pool)) = pg().await? else {
        return Ok(());
    };
    subscription_scenario(PgEventStore::new(pool), 20_000).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rebuild_without_downtime_while_appending() -> anyhow::Result<()> {
    let Some((_db, pool)) = pg().await? else {
        return Ok(());
    };
    rebuild_scenario(
        PgEventStore::new(pool.clone()),
        PgInbox::new(pool.clone()),
        ReadModel::Pg(pool.clone()),
        Box::new(PgProjectionAdmin::new(pool.clone())),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_runners_one_active() -> anyhow::Result<()> {
    let Some((_db, pool)) = pg().await? else {
        return Ok(());
    };
    two_runners_scenario(
        PgEventStore::new(pool.clone()),
        PgInbox::new(pool.clone()),
        ReadModel::Pg(pool.clone()),
    )
    .await
}

/// Events in PostgreSQL, the read model in SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_events_sqlite_read_model_rebuild() -> anyhow::Result<()> {
    let Some((_db, pool)) = pg().await? else {
        return Ok(());
    };
    let dbs = sqlite().await?;
    rebuild_scenario(
        PgEventStore::new(pool.clone()),
        SqliteInbox::new(dbs.read.clone()),
        ReadModel::Sqlite(dbs.read.clone()),
        Box::new(SqliteProjectionAdmin::new(dbs.read.clone())),
    )
    .await
}

/// A runner started with another code version rebuilds beside the active
/// generation and switches to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_new_code_version_rebuilds_beside_the_old() -> anyhow::Result<()> {
    let dbs = sqlite().await?;
    let head = append(&dbs.events, "ver", 4, 800, 20).await?;
    let store = SqliteInbox::new(dbs.read.clone());
    let read = ReadModel::Sqlite(dbs.read.clone());
    let mut old = ProjectionRunner::new(dbs.events.clone(), store.clone());
    old.spawn(Counter::v(1), config("old-code"))?;
    caught_up(&read, head).await?;
    old.stop().await;
    let mut new = ProjectionRunner::new(dbs.events.clone(), store);
    new.spawn(Counter::v(2), config("new-code"))?;
    let admin = SqliteProjectionAdmin::new(dbs.read.clone());
    let s = poll_until(
        WITHIN,
        EVERY,
        || async { Ok(admin.status(Some("counter")).await?) },
        |s| s[0].active.version == 2 && s[0].rebuild.is_none(),
    )
    .await?;
    ensure!(
        s[0].active.version == 2 && s[0].active.generation == 2,
        "{s:?}"
    );
    caught_up(&read, head).await?;
    ensure!(
        all_once(&read.applied().await?, head),
        "version 2's read model"
    );
    ensure!(
        read.totals().await? == fresh_build(&dbs.events).await?,
        "differs from a fresh build"
    );
    new.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_runner_killed_mid_batch_resumes_exactly_once() -> anyhow::Result<()> {
    let Some((db, pool)) = pg().await? else {
        return Ok(());
    };
    let events = PgEventStore::new(pool.clone());
    let head = append(&events, "k", 10, 3000, 20).await?;
    kill_scenario(
        &db.url,
        &db.url,
        head,
        ReadModel::Pg(pool.clone()),
        Box::new(PgProjectionAdmin::new(pool.clone())),
    )
    .await
}
