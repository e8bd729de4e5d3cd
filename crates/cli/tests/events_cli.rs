//! `custody events append|read|tail|streams` as a user runs them: the real
//! binary against real SQLite files and PostgreSQL databases. Each scenario
//! runs on both backends: appends and reads round-trip (JSON and binary
//! payloads), a conflict is a typed outcome with exit status 3 and nothing
//! written, `tail --follow` sees a later append and stops on SIGTERM with
//! status 0, a database that is not custody's fails loudly and is left
//! untouched, and bad input is refused before anything is opened.

mod common;

use std::process::Stdio;
use std::time::Duration;

use custody_testkit::process::{poll_until, Proc};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use common::Dir;

/// How long one command may take before the test fails.
const LIMIT: Duration = Duration::from_secs(120);

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_custody"));
    c.args(args)
        .env_remove("CUSTODY_DB")
        .env_remove("CUSTODY_CONFIG")
        .env_remove("CUSTODY_METRICS_ADDR")
        .env("CUSTODY_LOG", "warn")
        .kill_on_drop(true);
    c
}

/// What a finished command did.
struct Run {
    code: i32,
    out: String,
    err: String,
}

impl Run {
    /// Its stdout as JSON values, one per line.
    fn json(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        json_lines(&self.out)
    }
}

/// Run `custody args…` with `stdin` as its standard input.
async fn custody_in(args: &[&str], stdin: &str) -> anyhow::Result<Run> {
    let mut c = command(args);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn()?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).await?;
        // closing it is the end of input
        drop(input);
    }
    let out = tokio::time::timeout(LIMIT, child.wait_with_output()).await??;
    Ok(Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Run `custody args…` with an empty standard input.
async fn custody(args: &[&str]) -> anyhow::Result<Run> {
    custody_in(args, "").await
}

/// Run `custody args…`, which must exit 0.
async fn ok(args: &[&str]) -> anyhow::Result<Run> {
    let r = custody(args).await?;
    assert_eq!(r.code, 0, "custody {args:?}:\n{}{}", r.out, r.err);
    Ok(r)
}

fn json_lines(out: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    Ok(out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

/// `field` of every value, as text (numbers and strings alike).
fn column(values: &[serde_json::Value], field: &str) -> Vec<String> {
    values
        .iter()
        .map(|v| match &v[field] {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

/// The backends a scenario runs on: a fresh SQLite file (in `dir`) and,
/// when PostgreSQL is there (else SKIP, or a failure under
/// `CUSTODY_REQUIRE_SERVICES=1`), a fresh database.
async fn backends(
    dir: &Dir,
) -> anyhow::Result<(Vec<(String, String)>, Option<custody_testkit::PgTestDb>)> {
    let mut dbs = vec![("sqlite".to_owned(), dir.file("events.db"))];
    let pg = custody_testkit::postgres_db().await?;
    if let Some(pg) = &pg {
        dbs.push(("postgres".to_owned(), pg.url.clone()));
    }
    Ok((dbs, pg))
}

#[tokio::test]
async fn append_read_tail_and_streams_round_trip() -> anyhow::Result<()> {
    let dir = Dir::new("events-round-trip")?;
    let (dbs, _pg) = backends(&dir).await?;
    for (backend, db) in &dbs {
        round_trip(db)
            .await
            .map_err(|e| e.context(format!("on {backend}")))?;
    }
    Ok(())
}

async fn round_trip(db: &str) -> anyhow::Result<()> {
    // one event from --data, on a stream that must not exist yet
    let r = ok(&[
        "events",
        "append",
        "--db",
        db,
        "order-1",
        "--expected",
        "no-stream",
        "--type",
        "OrderPlaced",
        "--data",
        r#"{"total": 990}"#,
        "--tag",
        "customer:7",
        "--header",
        "correlationid=req-1",
    ])
    .await?;
    let appended = r.json()?;
    assert_eq!(appended.len(), 1, "{}", r.out);
    assert_eq!(appended[0]["outcome"], "appended");
    assert_eq!(appended[0]["first_version"], 1);
    assert_eq!(appended[0]["version"], 1);
    assert_eq!(appended[0]["idempotent"], false);
    let first_id = appended[0]["ids"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    // three payloads from standard input with --type, at version 1
    let r = custody_in(
        &[
            "events",
            "append",
            "--db",
            db,
            "order-1",
            "--expected",
            "1",
            "--type",
            "ItemAdded",
        ],
        "{\"sku\": \"a\"}\n\n{\"sku\": \"b\"}\n{\"sku\": \"c\"}\n",
    )
    .await?;
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    let a = r.json()?;
    assert_eq!(
        (a[0]["first_version"].as_u64(), a[0]["version"].as_u64()),
        (Some(2), Some(4))
    );
    assert_eq!(a[0]["ids"].as_array().map(Vec::len), Some(3));

    // objects with their own type from standard input, another stream
    let r = custody_in(
        &["events", "append", "--db", db, "invoice-9"],
        "{\"type\": \"InvoiceIssued\", \"data\": {\"n\": 1}, \"tags\": [\"customer:7\"]}\n\
         {\"type\": \"InvoicePaid\", \"data\": [1, 2], \"schema_version\": 2}\n",
    )
    .await?;
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    // a binary payload from a file
    let bin = dir_file(db, "blob.bin");
    std::fs::write(&bin, [0u8, 159, 146, 150, 255])?;
    ok(&[
        "events",
        "append",
        "--db",
        db,
        "order-1",
        "--expected",
        "exists",
        "--type",
        "Blob",
        "--file",
        &bin,
    ])
    .await?;
    let _ = std::fs::remove_file(&bin);

    // read forwards: every event of order-1, in version order
    let events = ok(&["events", "read", "--db", db, "order-1"])
        .await?
        .json()?;
    assert_eq!(column(&events, "version"), ["1", "2", "3", "4", "5"]);
    assert_eq!(
        column(&events, "type"),
        ["OrderPlaced", "ItemAdded", "ItemAdded", "ItemAdded", "Blob"]
    );
    assert_eq!(events[0]["id"], first_id.as_str());
    // JSON payloads as JSON, the binary one as base64
    assert_eq!(events[0]["payload"]["total"], 990);
    assert_eq!(events[0]["payload_encoding"], "json");
    assert_eq!(events[0]["tags"][0], "customer:7");
    assert_eq!(events[0]["headers"]["correlationid"], "req-1");
    assert_eq!(events[3]["payload"]["sku"], "c");
    assert_eq!(events[4]["payload_encoding"], "base64");
    assert_eq!(events[4]["payload"], "AJ+Slv8=");
    assert_eq!(events[4]["content_type"], "application/octet-stream");
    let positions: Vec<u64> = events
        .iter()
        .filter_map(|e| e["position"].as_u64())
        .collect();
    assert_eq!(positions.len(), 5);
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");

    // from a version, a limit, backwards
    let some = ok(&[
        "events", "read", "--db", db, "order-1", "--from", "2", "--limit", "2",
    ])
    .await?
    .json()?;
    assert_eq!(column(&some, "version"), ["2", "3"]);
    let back = ok(&["events", "read", "--db", db, "order-1", "--backward"])
        .await?
        .json()?;
    assert_eq!(column(&back, "version"), ["5", "4", "3", "2", "1"]);
    let back = ok(&[
        "events",
        "read",
        "--db",
        db,
        "order-1",
        "--backward",
        "--from",
        "3",
        "--limit",
        "2",
    ])
    .await?
    .json()?;
    assert_eq!(column(&back, "version"), ["3", "2"]);

    // the global log: all 7 events in position order, then filtered
    let all = ok(&["events", "tail", "--db", db]).await?.json()?;
    assert_eq!(all.len(), 7, "{all:?}");
    let pos: Vec<u64> = all.iter().filter_map(|e| e["position"].as_u64()).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "{pos:?}");
    let invoices = ok(&["events", "tail", "--db", db, "--category", "invoice"])
        .await?
        .json()?;
    assert_eq!(column(&invoices, "type"), ["InvoiceIssued", "InvoicePaid"]);
    assert_eq!(invoices[1]["schema_version"], 2);
    assert_eq!(invoices[1]["payload"], serde_json::json!([1, 2]));
    let items = ok(&["events", "tail", "--db", db, "--type", "ItemAdded"])
        .await?
        .json()?;
    assert_eq!(items.len(), 3);
    // after a position: only what came later
    let after = pos[4].to_string();
    let later = ok(&["events", "tail", "--db", db, "--from", &after])
        .await?
        .json()?;
    assert_eq!(later.len(), 2, "{later:?}");

    // streams, all and by prefix
    let streams = ok(&["events", "streams", "--db", db]).await?.json()?;
    assert_eq!(column(&streams, "stream"), ["invoice-9", "order-1"]);
    assert_eq!(column(&streams, "version"), ["2", "5"]);
    assert_eq!(streams[1]["category"], "order");
    let orders = ok(&["events", "streams", "--db", db, "--prefix", "ord"])
        .await?
        .json()?;
    assert_eq!(column(&orders, "stream"), ["order-1"]);
    let none = ok(&["events", "streams", "--db", db, "--prefix", "zzz"]).await?;
    assert!(none.out.is_empty(), "{}", none.out);
    assert!(
        none.err.contains("no stream name starts with \"zzz\""),
        "{}",
        none.err
    );
    Ok(())
}

/// A scratch file next to a SQLite database, or in the temporary directory
/// for a PostgreSQL URL.
fn dir_file(db: &str, name: &str) -> String {
    let dir = if db.starts_with("postgres") {
        std::env::temp_dir()
    } else {
        std::path::Path::new(db)
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_else(std::env::temp_dir)
    };
    dir.join(format!("{}-{name}", custody_testkit::unique_name("f")))
        .to_string_lossy()
        .into_owned()
}

#[tokio::test]
async fn a_conflict_is_a_typed_outcome_with_exit_status_3() -> anyhow::Result<()> {
    let dir = Dir::new("events-conflict")?;
    let (dbs, _pg) = backends(&dir).await?;
    for (backend, db) in &dbs {
        conflict(db)
            .await
            .map_err(|e| e.context(format!("on {backend}")))?;
    }
    Ok(())
}

async fn conflict(db: &str) -> anyhow::Result<()> {
    let append = |expected: &'static str, id: Option<&'static str>| {
        let db = db.to_owned();
        async move {
            let mut args = vec![
                "events",
                "append",
                "--db",
                &db,
                "account-7",
                "--expected",
                expected,
                "--type",
                "Deposited",
                "--data",
                "{\"cents\": 500}",
            ];
            if let Some(id) = id {
                args.extend(["--id", id]);
            }
            custody(&args).await
        }
    };
    const ID: &str = "01936b2e-1f3a-7cc0-8a51-3f1e5d0c9b7a";
    let r = append("no-stream", Some(ID)).await?;
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    let r = append("1", None).await?;
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);

    // the stream is at 2: expecting 1 is refused, typed, exit 3
    let r = append("1", None).await?;
    assert_eq!(r.code, 3, "{}{}", r.out, r.err);
    let outcome = r.json()?;
    assert_eq!(outcome.len(), 1, "{}", r.out);
    assert_eq!(outcome[0]["outcome"], "wrong_version");
    assert_eq!(outcome[0]["expected"], 1);
    assert_eq!(outcome[0]["actual"], 2);
    assert!(
        r.err.contains("is at version 2, not version 1"),
        "{}",
        r.err
    );
    assert!(r.err.contains("--expected 2"), "{}", r.err);
    // no-stream on an existing stream: the same, named
    let r = append("no-stream", None).await?;
    assert_eq!(r.code, 3, "{}{}", r.out, r.err);
    assert_eq!(r.json()?[0]["expected"], "no-stream");
    assert_eq!(r.json()?[0]["actual"], 2);
    // exists on a stream that does not exist: actual is null
    let r = custody(&[
        "events",
        "append",
        "--db",
        db,
        "account-8",
        "--expected",
        "exists",
        "--type",
        "T",
        "--data",
        "1",
    ])
    .await?;
    assert_eq!(r.code, 3, "{}{}", r.out, r.err);
    assert_eq!(r.json()?[0]["actual"], serde_json::Value::Null);
    assert!(r.err.contains("does not exist"), "{}", r.err);

    // nothing was written by the refused appends
    let events = ok(&["events", "read", "--db", db, "account-7"])
        .await?
        .json()?;
    assert_eq!(column(&events, "version"), ["1", "2"]);
    let streams = ok(&["events", "streams", "--db", db]).await?.json()?;
    assert_eq!(column(&streams, "stream"), ["account-7"]);

    // the first append retried with its id at its version: idempotent
    let r = append("no-stream", Some(ID)).await?;
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    assert_eq!(r.json()?[0]["idempotent"], true);
    assert_eq!(r.json()?[0]["version"], 1);
    let events = ok(&["events", "read", "--db", db, "account-7"])
        .await?
        .json()?;
    assert_eq!(events.len(), 2, "a retried append wrote twice: {events:?}");
    Ok(())
}

#[tokio::test]
async fn tail_follow_sees_a_later_append_and_stops_on_sigterm() -> anyhow::Result<()> {
    let dir = Dir::new("events-follow")?;
    let (dbs, _pg) = backends(&dir).await?;
    for (backend, db) in &dbs {
        follow(db)
            .await
            .map_err(|e| e.context(format!("on {backend}")))?;
    }
    Ok(())
}

async fn follow(db: &str) -> anyhow::Result<()> {
    ok(&[
        "events", "append", "--db", db, "cart-1", "--type", "Opened", "--data", "{}",
    ])
    .await?;
    let mut tail = Proc::spawn(
        "tail",
        command(&[
            "events",
            "tail",
            "--db",
            db,
            "--follow",
            "--category",
            "cart",
        ]),
    )?;
    tail.wait_line("caught up at position", LIMIT).await?;
    assert!(
        tail.lines().iter().any(|l| l.contains("\"Opened\"")),
        "the catch-up printed no existing event:\n{}",
        tail.output()
    );
    // an event of another category is not printed; the next one is
    ok(&[
        "events", "append", "--db", db, "other-1", "--type", "Skipped", "--data", "{}",
    ])
    .await?;
    let r = ok(&[
        "events",
        "append",
        "--db",
        db,
        "cart-1",
        "--type",
        "ItemAdded",
        "--data",
        "{\"sku\": \"late\"}",
    ])
    .await?;
    let late_id = r.json()?[0]["ids"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let lines = poll_until(
        LIMIT,
        Duration::from_millis(50),
        || async { Ok(tail.lines()) },
        |lines| lines.iter().any(|l| l.contains(&late_id)),
    )
    .await?;
    assert!(
        lines.iter().any(|l| l.contains(&late_id)),
        "tail --follow did not print the event appended later ({late_id}):\n{}",
        lines.join("\n")
    );
    tail.terminate().await?;
    let printed: Vec<serde_json::Value> = tail
        .lines()
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l))
        .collect::<Result<_, _>>()?;
    assert_eq!(column(&printed, "type"), ["Opened", "ItemAdded"]);
    assert_eq!(printed[1]["payload"]["sku"], "late");
    assert!(
        tail.lines()
            .iter()
            .any(|l| l.starts_with("tail stopped: 2 events printed")),
        "{}",
        tail.output()
    );
    Ok(())
}

#[tokio::test]
async fn a_database_that_is_not_custodys_fails_loudly_and_is_left_alone() -> anyhow::Result<()> {
    let dir = Dir::new("events-not-custody")?;
    // a SQLite file of another application
    let foreign = dir.file("foreign.db");
    {
        let pool = custody::sqlite::connect(&foreign).await?;
        sqlx::query("CREATE TABLE accounts (id INTEGER PRIMARY KEY)")
            .execute(&pool)
            .await?;
        pool.close().await;
    }
    for args in [
        vec!["events", "read", "--db", &foreign, "order-1"],
        vec!["events", "tail", "--db", &foreign],
        vec!["events", "streams", "--db", &foreign],
    ] {
        let r = custody(&args).await?;
        assert_eq!(r.code, 1, "{args:?}: {}{}", r.out, r.err);
        assert!(r.err.contains("no custody tables"), "{args:?}: {}", r.err);
        assert!(r.out.is_empty(), "{}", r.out);
    }
    let pool = custody::sqlite::connect(&foreign).await?;
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .fetch_all(&pool)
            .await?;
    pool.close().await;
    assert_eq!(tables, ["accounts"], "a read wrote to the database");

    // a mistyped path: an error naming it, no file created
    let missing = dir.file("typo.db");
    let r = custody(&["events", "tail", "--db", &missing]).await?;
    assert_eq!(r.code, 1, "{}{}", r.out, r.err);
    assert!(r.err.contains("does not exist"), "{}", r.err);
    assert!(!std::path::Path::new(&missing).exists());

    // a PostgreSQL database without custody's tables
    if let Some(pg) = custody_testkit::postgres_db().await? {
        let r = custody(&["events", "read", "--db", &pg.url, "order-1"]).await?;
        assert_eq!(r.code, 1, "{}{}", r.out, r.err);
        assert!(r.err.contains("no custody tables"), "{}", r.err);
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&pg.url).await?;
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
        )
        .fetch_one(&mut conn)
        .await?;
        assert_eq!(n, 0, "a read created tables");
    }

    // a custody database, a stream that is not there: named, with the streams there
    let db = dir.file("custody.db");
    ok(&[
        "events", "append", "--db", &db, "order-1", "--type", "T", "--data", "{}",
    ])
    .await?;
    let r = custody(&["events", "read", "--db", &db, "order-2"]).await?;
    assert_eq!(r.code, 1, "{}{}", r.out, r.err);
    assert!(
        r.err.contains("stream \"order-2\" does not exist") && r.err.contains("\"order-1\""),
        "{}",
        r.err
    );
    Ok(())
}

#[tokio::test]
async fn bad_input_is_named_and_opens_nothing() -> anyhow::Result<()> {
    let dir = Dir::new("events-bad-input")?;
    let db = dir.file("never.db");
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec![
                "events", "append", "--db", &db, "s-1", "--type", "T", "--data", "{x",
            ],
            "",
            "--data \"{x\" is not valid JSON",
        ),
        (
            vec![
                "events", "append", "--db", &db, "", "--type", "T", "--data", "{}",
            ],
            "",
            "stream name \"\" must be 1 to",
        ),
        (
            vec!["events", "append", "--db", &db, "s-1", "--data", "{}"],
            "",
            "--type is required with --data",
        ),
        (
            vec!["events", "append", "--db", &db, "s-1", "--type", "T"],
            "{\"a\": 1}\nnot json\n",
            "line 2 of standard input",
        ),
        (
            vec!["events", "append", "--db", &db, "s-1"],
            "{\"data\": 1}\n",
            "without --type each line is an object",
        ),
        (
            vec!["events", "append", "--db", &db, "s-1", "--type", "T"],
            "\n  \n",
            "nothing to append",
        ),
        (
            vec![
                "events", "append", "--db", &db, "s-1", "--type", "", "--data", "{}",
            ],
            "",
            "the type must be 1 to",
        ),
        (
            vec!["events", "read", "--db", &db, ""],
            "",
            "stream name \"\" must be 1 to",
        ),
        (
            vec![
                "events",
                "append",
                "--db",
                "mysql://u@h/db",
                "s-1",
                "--type",
                "T",
                "--data",
                "{}",
            ],
            "",
            "accepted:",
        ),
    ];
    for (args, stdin, says) in &cases {
        let r = custody_in(args, stdin).await?;
        assert_eq!(r.code, 1, "{args:?}: {}{}", r.out, r.err);
        assert!(
            r.err.contains(says),
            "{args:?} should say {says:?}:\n{}",
            r.err
        );
        assert!(r.out.is_empty(), "{args:?}: {}", r.out);
        assert!(
            !std::path::Path::new(&db).exists(),
            "{args:?} created the database"
        );
    }
    // a malformed --expected is a usage error (2) naming the accepted forms
    let r = custody(&[
        "events",
        "append",
        "--db",
        &db,
        "s-1",
        "--expected",
        "latest",
        "--type",
        "T",
        "--data",
        "{}",
    ])
    .await?;
    assert_eq!(r.code, 2, "{}{}", r.out, r.err);
    assert!(
        r.err.contains("any, no-stream, exists or a number"),
        "{}",
        r.err
    );
    assert!(!std::path::Path::new(&db).exists());
    Ok(())
}

#[tokio::test]
async fn help_hides_the_database_url_from_the_environment() -> anyhow::Result<()> {
    for sub in ["append", "read", "tail", "streams"] {
        let mut c = command(&["events", sub, "--help"]);
        c.env("CUSTODY_DB", "postgres://app:s3cret-77@db/shop");
        let out = tokio::time::timeout(LIMIT, c.output()).await??;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("CUSTODY_DB"), "{text}");
        assert!(
            !text.contains("s3cret-77"),
            "events {sub} --help shows the URL: {text}"
        );
    }
    Ok(())
}
