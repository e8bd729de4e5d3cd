//! `custody projection status|rebuild|reset|dead-letters|retry` as a user
//! runs them, against a read model kept by a projection runner in this test
//! process (the application's side) over a real SQLite event store.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context};
use custody::event::{EventData, EventStore, ExpectedVersion, LogFilter, RecordedEvent};
use custody::projection::{Projection, ProjectionConfig, ProjectionRunner, Tables};
use custody::sqlite::{SqliteEventStore, SqliteInbox};
use custody::{HandlerError, LeaseConfig};
use custody_testkit::process::poll_until;
use sqlx::SqlitePool;

const WITHIN: Duration = Duration::from_secs(60);

/// One row per applied event; fails permanently on `Poison`.
struct Seen;

impl Projection<SqliteInbox> for Seen {
    fn name(&self) -> &str {
        "seen"
    }
    fn version(&self) -> u32 {
        1
    }
    fn filter(&self) -> LogFilter {
        LogFilter::all()
    }
    fn tables(&self) -> Vec<String> {
        vec!["seen".into()]
    }
    async fn setup(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        tables: &Tables,
    ) -> Result<(), HandlerError> {
        sqlx::query(&format!(
            "CREATE TABLE {} (position INTEGER PRIMARY KEY)",
            tables.name("seen")
        ))
        .execute(&mut **tx)
        .await
        .map_err(HandlerError::transient)?;
        Ok(())
    }
    async fn apply(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), HandlerError> {
        if event.event_type == "Poison" {
            return Err(HandlerError::permanent("cannot apply a Poison event"));
        }
        sqlx::query(&format!(
            "INSERT INTO {} (position) VALUES ($1)",
            tables.name("seen")
        ))
        .bind(event.position as i64)
        .execute(&mut **tx)
        .await
        .map_err(HandlerError::transient)?;
        Ok(())
    }
}

struct Setup {
    dir: common::Dir,
    events: SqliteEventStore,
    read: SqlitePool,
    runner: ProjectionRunner<SqliteEventStore, SqliteInbox>,
}

async fn setup(tag: &str, count: usize) -> anyhow::Result<Setup> {
    let dir = common::Dir::new(tag)?;
    let events_pool = custody::sqlite::connect(&dir.file("events.db")).await?;
    custody::sqlite::migrate(&events_pool).await?;
    let read = custody::sqlite::connect(&dir.file("read.db")).await?;
    custody::sqlite::migrate(&read).await?;
    let events = SqliteEventStore::new(events_pool);
    for chunk in 0..count / 100 {
        let batch = (0..100)
            .map(|i| EventData::json("Added", &serde_json::json!({ "n": chunk * 100 + i })))
            .collect::<Result<Vec<_>, _>>()?;
        events
            .append(&format!("item-{}", chunk % 7), ExpectedVersion::Any, batch)
            .await?;
    }
    let mut runner = ProjectionRunner::new(events.clone(), SqliteInbox::new(read.clone()));
    runner.spawn(
        Seen,
        ProjectionConfig {
            batch_size: 200,
            lease: LeaseConfig {
                holder: "app-runner".into(),
                ttl: Duration::from_secs(5),
                renew_interval: Duration::from_secs(1),
            },
            idle_wait: Duration::from_millis(100),
            ..ProjectionConfig::default()
        },
    )?;
    Ok(Setup {
        dir,
        events,
        read,
        runner,
    })
}

async fn rows(read: &SqlitePool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM seen")
        .fetch_one(read)
        .await?)
}

async fn caught_up(s: &Setup) -> anyhow::Result<()> {
    let head = s.events.head().await?;
    let runner = &s.runner;
    let done = poll_until(
        WITHIN,
        Duration::from_millis(50),
        || async {
            Ok(runner
                .status("seen")
                .and_then(|st| st.generation)
                .map_or(0, |g| g.checkpoint))
        },
        |cp| *cp >= head,
    )
    .await?;
    ensure!(done >= head, "the runner stopped at {done} of {head}");
    Ok(())
}

async fn custody(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = tokio::time::timeout(
        WITHIN * 2,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_custody"))
            .args(args)
            .env_remove("CUSTODY_DB")
            .output(),
    )
    .await
    .context("custody did not finish")??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_rebuild_and_reset_through_the_cli() -> anyhow::Result<()> {
    let s = setup("projection", 3000).await?;
    caught_up(&s).await?;
    let db = s.dir.file("read.db");

    let (ok, out, err) = custody(&["projection", "status", "--db", &db, "--json"]).await?;
    ensure!(ok, "status failed: {err}");
    let status: serde_json::Value = serde_json::from_str(out.trim()).context("status JSON")?;
    ensure!(status["name"] == "seen", "{status}");
    ensure!(status["active"]["checkpoint"] == 3000, "{status}");
    ensure!(
        status["head"] == 3000 && status["lag_events"] == 0,
        "{status}"
    );
    ensure!(status["runner"] == "app-runner", "{status}");

    let (ok, out, err) = custody(&["projection", "status", "--db", &db]).await?;
    ensure!(ok, "status failed: {err}");
    ensure!(
        out.contains("seen") && out.contains("app-runner") && out.contains("LAG"),
        "table: {out}"
    );

    // rebuild while the runner runs: readers keep the view, then generation 2
    let (ok, out, err) = custody(&[
        "projection",
        "rebuild",
        "seen",
        "--db",
        &db,
        "--timeout",
        "60s",
    ])
    .await?;
    ensure!(ok, "rebuild failed: {err}");
    ensure!(out.contains("generation 2"), "rebuild output: {out}");
    ensure!(rows(&s.read).await? == 3000, "rebuilt read model rows");

    // reset to 1000: only later events are in the read model
    let (ok, out, err) = custody(&[
        "projection",
        "reset",
        "seen",
        "--to",
        "1000",
        "--db",
        &db,
        "--timeout",
        "60s",
    ])
    .await?;
    ensure!(ok, "reset failed: {err}");
    ensure!(out.contains("generation 3"), "reset output: {out}");
    let read = &s.read;
    let n = poll_until(
        WITHIN,
        Duration::from_millis(50),
        || rows(read),
        |n| *n == 2000,
    )
    .await?;
    ensure!(
        n == 2000,
        "{n} rows after reset --to 1000, not the 2000 events after it"
    );

    // unknown names and missing databases are errors that say what to do
    let (ok, _, err) = custody(&["projection", "rebuild", "nope", "--db", &db]).await?;
    ensure!(
        !ok && err.contains("no projection \"nope\"") && err.contains("seen"),
        "{err}"
    );
    let missing = s.dir.file("missing.db");
    let (ok, _, err) = custody(&["projection", "status", "--db", &missing]).await?;
    ensure!(!ok && err.contains("does not exist"), "{err}");
    s.runner.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_retried_through_the_cli() -> anyhow::Result<()> {
    let s = setup("projection-dlq", 200).await?;
    s.events
        .append(
            "bad-1",
            ExpectedVersion::Any,
            vec![EventData::json("Poison", &serde_json::json!({}))?],
        )
        .await?;
    caught_up(&s).await?;
    let db = s.dir.file("read.db");
    let (ok, out, err) =
        custody(&["projection", "dead-letters", "seen", "--db", &db, "--json"]).await?;
    ensure!(ok, "{err}");
    let dead: serde_json::Value = serde_json::from_str(out.trim()).context("dead letter JSON")?;
    ensure!(
        dead["position"] == 201 && dead["stream"] == "bad-1",
        "{dead}"
    );
    ensure!(
        dead["reason"]
            .as_str()
            .is_some_and(|r| r.contains("Poison")),
        "{dead}"
    );
    let (ok, out, _) = custody(&["projection", "status", "--db", &db, "--json"]).await?;
    ensure!(ok, "status");
    let status: serde_json::Value = serde_json::from_str(out.trim())?;
    ensure!(status["dead_letters"] == 1, "{status}");
    let (ok, out, err) = custody(&[
        "projection",
        "retry",
        "seen",
        "--position",
        "201",
        "--db",
        &db,
    ])
    .await?;
    ensure!(ok && out.contains("1 dead letter"), "{out}{err}");
    // it fails again (the projection was not fixed): the reason stays, the mark goes
    let admin = custody::projection::open_projection_admin(&db).await?;
    let left = poll_until(
        WITHIN,
        Duration::from_millis(50),
        || async { Ok(admin.dead_letters("seen").await?) },
        |d| d.first().is_some_and(|d| !d.retry_requested),
    )
    .await?;
    ensure!(left.len() == 1 && !left[0].retry_requested, "{left:?}");
    let (ok, _, err) = custody(&[
        "projection",
        "retry",
        "seen",
        "--position",
        "7",
        "--db",
        &db,
    ])
    .await?;
    ensure!(!ok && err.contains("no dead letter at position 7"), "{err}");
    s.runner.stop().await;
    Ok(())
}
