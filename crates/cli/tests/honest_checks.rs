//! Checks that never say OK about nothing (issue 11, scenario 9; docs/ARCHITECTURE.md
//! invariant 8), through the real `custody` binary: `reconcile`, `trace`
//! and `dlq` never create or migrate what they are pointed at; a missing
//! SQLite file, a PostgreSQL database without custody's tables, a topic or
//! a consumer name never seen fail with an error naming it; a reconcile
//! that compared nothing says so and exits non-zero; the settle window says
//! how many messages it left out. And config values out of range are named
//! with their range, from a TOML file and from `CUSTODY_*` variables.

mod common;

use common::Dir;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use custody::postgres::{PgInbox, PgOutbox};
use custody::sqlite::{SqliteEmbeddedSubscriber, SqliteInbox, SqliteOutbox};
use custody::{Consumer, ConsumerConfig, Handler, HandlerError, InboxOutcome, InboxStore, Message};
use sqlx::Connection;

struct Apply;

impl<Tx: Send + 'static> Handler<Tx> for Apply {
    async fn handle(&self, _tx: &mut Tx, _msg: &Message) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn custody_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(i32, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_custody"))
        .args(args)
        .env("CUSTODY_LOG", "error")
        .envs(env.iter().copied())
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn custody(args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    custody_env(args, &[])
}

fn steps(n: usize) -> anyhow::Result<Vec<Message>> {
    (0..n)
        .map(|i| {
            Ok(Message::builder("steps", format!("k{}", i % 3), "Step")
                .json(&i)?
                .build()?)
        })
        .collect()
}

/// Database files of `dir`, sorted: what a command left behind (an open
/// WAL database's `-wal` and `-shm` files come and go with its readers).
fn files(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| {
            !n.as_ref()
                .is_ok_and(|n| n.ends_with("-wal") || n.ends_with("-shm"))
        })
        .collect::<Result<_, _>>()?;
    names.sort();
    Ok(names)
}

/// Producer `a.db` with 20 messages of topic `steps`, consumed by `billing`
/// into `b.db` through the embedded transport, all just now.
async fn sqlite_pipeline(dir: &Dir) -> anyhow::Result<(String, String)> {
    let (a_path, b_path) = (dir.file("a.db"), dir.file("b.db"));
    let a = custody::sqlite::connect(&a_path).await?;
    let b = custody::sqlite::connect(&b_path).await?;
    custody::sqlite::migrate(&a).await?;
    custody::sqlite::migrate(&b).await?;
    let mut tx = a.begin().await?;
    SqliteOutbox::new(a.clone())
        .enqueue_batch(&mut tx, &steps(20)?)
        .await?;
    tx.commit().await?;
    let sub = SqliteEmbeddedSubscriber::new(a.clone(), "billing", &["steps".to_owned()]).await?;
    let mut cfg = ConsumerConfig::new("billing");
    cfg.fetch_wait = Duration::from_millis(20);
    let mut c = Consumer::new(SqliteInbox::new(b.clone()), sub, Apply, cfg);
    while c.run_once().await? > 0 {}
    a.close().await;
    b.close().await;
    Ok((a_path, b_path))
}

#[tokio::test]
async fn reconcile_right_after_a_run_says_what_the_settle_window_left_out() -> anyhow::Result<()> {
    let dir = Dir::new("honest-settle")?;
    let (a, b) = sqlite_pipeline(&dir).await?;
    let base = [
        "reconcile",
        "--producer",
        &a,
        "--consumer",
        &b,
        "--consumer-name",
        "billing",
        "--topic",
        "steps",
    ];
    // everything is younger than the default --settle 1m: nothing compared
    let (code, out, err) = custody(&base)?;
    assert_eq!(code, 3, "compared nothing → exit 3: {out}{err}");
    assert!(!out.contains("RESULT: OK"), "{out}");
    assert!(out.contains("RESULT: NOTHING COMPARED"), "{out}");
    assert!(
        out.contains("left out 20 message(s) younger than 1m; pass --settle 0s to include them"),
        "{out}"
    );
    let mut json = base.to_vec();
    json.push("--json");
    let (code, out, err) = custody(&json)?;
    assert_eq!(code, 3, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        (v["sent"].as_u64(), v["left_out"].as_u64()),
        (Some(0), Some(20)),
        "{out}"
    );

    // with the window closed, the same databases compare clean
    let mut now = base.to_vec();
    now.extend(["--settle", "0s"]);
    let (code, out, err) = custody(&now)?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("sent 20, processed 20") && out.contains("RESULT: OK"),
        "{out}"
    );
    assert!(!out.contains("left out"), "{out}");
    Ok(())
}

#[tokio::test]
async fn names_never_seen_are_errors_and_nothing_is_created() -> anyhow::Result<()> {
    let dir = Dir::new("honest-names")?;
    let (a, b) = sqlite_pipeline(&dir).await?;
    let before = files(dir.0.path())?;
    let reconcile = |producer: &str, consumer: &str, name: &str, topic: &str| {
        custody(&[
            "reconcile",
            "--producer",
            producer,
            "--consumer",
            consumer,
            "--consumer-name",
            name,
            "--topic",
            topic,
            "--settle",
            "0s",
        ])
    };

    // --topic ordres: a typo
    let (code, out, err) = reconcile(&a, &b, "billing", "ordres")?;
    assert_ne!(code, 0, "{out}{err}");
    assert!(!out.contains("RESULT: OK"), "{out}");
    assert!(
        err.contains("topic \"ordres\" was never seen")
            && err.contains("(topics there: \"steps\")"),
        "{err}"
    );

    // --consumer billng.db: a mistyped file is not created
    let typo = dir.file("billng.db");
    let (code, out, err) = reconcile(&a, &typo, "billing", "steps")?;
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains(&format!("consumer database {typo}")) && err.contains("does not exist"),
        "{err}"
    );
    // --consumer-name billng
    let (code, out, err) = reconcile(&a, &b, "billng", "steps")?;
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("consumer \"billng\" has never recorded a message")
            && err.contains("(consumers there: \"billing\")"),
        "{err}"
    );
    // the live check of an unknown consumer, too
    let (code, out, err) = custody(&[
        "reconcile",
        "--live",
        "--consumer",
        &b,
        "--consumer-name",
        "billng",
    ])?;
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("consumer \"billng\""), "{err}");
    // the producer's outbox given as the consumer's inbox: no such consumer there
    let (code, _, err) = reconcile(&a, &a, "billing", "steps")?;
    assert_ne!(code, 0);
    assert!(
        err.contains("(no consumer has recorded anything there yet)"),
        "{err}"
    );

    // dlq list --db typo.db
    let typo_dlq = dir.file("typo.db");
    let (code, out, err) = custody(&["dlq", "list", "--db", &typo_dlq])?;
    assert_ne!(code, 0, "{out}{err}");
    assert!(!out.contains("dead letter(s)"), "{out}");
    assert!(
        err.contains(&typo_dlq) && err.contains("does not exist"),
        "{err}"
    );
    // dlq filters name what they filter on
    let (code, _, err) = custody(&["dlq", "list", "--db", &b, "--consumer", "billng"])?;
    assert_ne!(code, 0);
    assert!(err.contains("consumer \"billng\""), "{err}");
    let (code, _, err) = custody(&["dlq", "list", "--db", &b, "--topic", "ordres"])?;
    assert_ne!(code, 0);
    assert!(err.contains("topic \"ordres\""), "{err}");
    let (code, out, err) = custody(&["dlq", "list", "--db", &b, "--consumer", "billing"])?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("0 dead letter(s)"), "{out}");
    // trace, sqlite:// url form
    let id = uuid::Uuid::now_v7().to_string();
    let url = format!("sqlite://{}", dir.file("trace-typo.db"));
    let (code, _, err) = custody(&["trace", &id, "--db", &a, "--db", &url])?;
    assert_ne!(code, 0);
    assert!(
        err.contains("trace-typo.db") && err.contains("does not exist"),
        "{err}"
    );

    assert_eq!(files(dir.0.path())?, before, "a check created files");

    // a SQLite file that is not custody's: not migrated, not reported clean
    let foreign = dir.file("foreign.db");
    {
        let mut c =
            sqlx::SqliteConnection::connect(&format!("sqlite://{foreign}?mode=rwc")).await?;
        sqlx::query("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
            .execute(&mut c)
            .await?;
        c.close().await?;
    }
    let (code, _, err) = reconcile(&a, &foreign, "billing", "steps")?;
    assert_ne!(code, 0);
    assert!(err.contains("has no custody tables"), "{err}");
    let (code, _, err) = custody(&["dlq", "list", "--db", &foreign])?;
    assert_ne!(code, 0);
    assert!(err.contains("has no custody tables"), "{err}");
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{foreign}")).await?;
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .fetch_all(&mut c)
            .await?;
    assert_eq!(tables, ["orders"]);

    // custody's tables with a migration missing: told to migrate, not migrated
    let mut b_conn = sqlx::SqliteConnection::connect(&format!("sqlite://{b}")).await?;
    let last: i64 = sqlx::query_scalar("SELECT MAX(version) FROM custody_migrations")
        .fetch_one(&mut b_conn)
        .await?;
    sqlx::query("DELETE FROM custody_migrations WHERE version = ?1")
        .bind(last)
        .execute(&mut b_conn)
        .await?;
    let (code, _, err) = reconcile(&a, &b, "billing", "steps")?;
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("migrations {last} not applied")) && err.contains("custody migrate"),
        "{err}"
    );
    let still: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM custody_migrations WHERE version = ?1")
            .bind(last)
            .fetch_one(&mut b_conn)
            .await?;
    assert_eq!(still, 0, "reconcile migrated the consumer's database");
    Ok(())
}

/// Tables of `url`'s database outside PostgreSQL's own schemas.
async fn pg_tables(url: &str) -> anyhow::Result<Vec<String>> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    let t = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
    )
    .fetch_all(&mut c)
    .await?;
    c.close().await?;
    Ok(t)
}

#[tokio::test]
async fn a_postgres_database_without_custody_tables_is_refused_untouched() -> anyhow::Result<()> {
    let Some(empty) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let Some(other) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let (code, out, err) = custody(&[
        "reconcile",
        "--producer",
        &other.url,
        "--consumer",
        &empty.url,
        "--consumer-name",
        "billing",
        "--topic",
        "orders",
    ])?;
    assert_ne!(code, 0, "{out}{err}");
    assert!(!out.contains("RESULT: OK"), "{out}");
    assert!(err.contains("has no custody tables"), "{err}");
    let (code, _, err) = custody(&["dlq", "list", "--db", &empty.url])?;
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("database {}", empty.url)) && err.contains("has no custody tables"),
        "{err}"
    );
    let id = uuid::Uuid::now_v7().to_string();
    let (code, _, err) = custody(&["trace", &id, "--db", &empty.url])?;
    assert_ne!(code, 0);
    assert!(err.contains("has no custody tables"), "{err}");
    let (code, _, err) = custody(&[
        "reconcile",
        "--live",
        "--consumer",
        &empty.url,
        "--consumer-name",
        "billing",
    ])?;
    assert_ne!(code, 0);
    assert!(err.contains("has no custody tables"), "{err}");
    assert_eq!(
        pg_tables(&empty.url).await?,
        Vec::<String>::new(),
        "a check created tables"
    );
    assert_eq!(
        pg_tables(&other.url).await?,
        Vec::<String>::new(),
        "a check created tables"
    );
    // a database name that does not exist is named too
    let missing = format!("{}_missing", empty.url);
    let (code, _, err) = custody(&["dlq", "list", "--db", &missing])?;
    assert_ne!(code, 0);
    assert!(err.contains("does not exist"), "{err}");
    Ok(())
}

#[tokio::test]
async fn postgres_reconcile_names_typos_and_settles() -> anyhow::Result<()> {
    let Some(pa) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let Some(pb) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let a = custody::postgres::connect(&pa.url).await?;
    let b = custody::postgres::connect(&pb.url).await?;
    custody::postgres::migrate(&a).await?;
    custody::postgres::migrate(&b).await?;
    let msgs = steps(12)?;
    let mut tx = a.begin().await?;
    PgOutbox::new(a.clone())
        .enqueue_batch(&mut tx, &msgs)
        .await?;
    tx.commit().await?;
    // the consumer's side as its engine records it (the embedded reader
    // would wait here for every transaction in flight on the server)
    let inbox = PgInbox::new(b.clone());
    for m in &msgs {
        let mut tx = inbox.begin().await?;
        let outcome = inbox
            .record(&mut tx, "billing", m, chrono::Utc::now())
            .await?;
        inbox.commit(tx).await?;
        assert_eq!(outcome, InboxOutcome::New, "{}", m.id);
    }
    a.close().await;
    b.close().await;

    let run = |name: &str, topic: &str, settle: &str| {
        custody(&[
            "reconcile",
            "--producer",
            &pa.url,
            "--consumer",
            &pb.url,
            "--consumer-name",
            name,
            "--topic",
            topic,
            "--settle",
            settle,
        ])
    };
    let (code, out, err) = run("billing", "steps", "1m")?;
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        out.contains("left out 12 message(s) younger than 1m"),
        "{out}"
    );
    let (code, out, err) = run("billing", "ordres", "0s")?;
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("topic \"ordres\" was never seen") && err.contains("\"steps\""),
        "{err}"
    );
    let (code, out, err) = run("billng", "steps", "0s")?;
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("consumer \"billng\"") && err.contains("\"billing\""),
        "{err}"
    );
    let (code, out, err) = run("billing", "steps", "0s")?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("sent 12, processed 12") && out.contains("RESULT: OK"),
        "{out}"
    );
    let (code, out, err) = custody(&["dlq", "list", "--db", &pb.url, "--topic", "steps"])?;
    assert_eq!(code, 0, "{out}{err}");
    Ok(())
}

#[tokio::test]
async fn config_values_out_of_range_are_named_with_their_range() -> anyhow::Result<()> {
    let dir = Dir::new("honest-config")?;
    let cfg = dir.file("custody.toml");
    std::fs::write(
        &cfg,
        "[relay]\nbatch-size = 0\n\n[consumer]\nbatch-size = 0\n",
    )?;
    let db = dir.file("never.db");
    let relay = [
        "relay",
        "--config",
        &cfg,
        "--db",
        &db,
        "--nats",
        "nats://127.0.0.1:1",
    ];
    let (code, out, err) = custody(&relay)?;
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("relay.batch-size = 0: must be between 1 and 100000")
            && err.contains("consumer.batch-size = 0: must be between 1 and 100000"),
        "{err}"
    );

    // environment overrides are checked the same way (and override the file)
    std::fs::write(&cfg, "[relay]\nbatch-size = 10\n")?;
    let (code, out, err) = custody_env(&relay, &[("CUSTODY_CONSUMER__BATCH_SIZE", "0")])?;
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("consumer.batch-size = 0"), "{err}");
    assert!(!err.contains("relay.batch-size"), "{err}");
    let (code, out, err) = custody_env(
        &["relay", "--db", &db, "--nats", "nats://127.0.0.1:1"],
        &[
            ("CUSTODY_RELAY__POLL_INTERVAL", "0ms"),
            ("CUSTODY_RELAY__BATCH_SIZE", "0"),
        ],
    )?;
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("relay.poll-interval = \"0ms\": must be between \"1ms\" and \"1h\"")
            && err.contains("relay.batch-size = 0"),
        "{err}"
    );
    assert!(
        !Path::new(&db).exists(),
        "the relay started before its config was checked"
    );
    Ok(())
}
