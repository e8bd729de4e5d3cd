//! `custody produce` and `custody consume` as a user runs them: the real
//! binary against real SQLite files, PostgreSQL, NATS JetStream and a local
//! HTTP endpoint; every message applied exactly once in effect, across a
//! `kill -9` of the consumer, retries and dead letters checked in the
//! databases and through `custody dlq`.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use custody_testkit::process::{poll_until, Proc};
use tokio::process::Command;

/// Run `custody args…` to the end: (exit code, stdout, stderr).
async fn custody(args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = tokio::time::timeout(Duration::from_secs(120), command(args).output()).await??;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

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

/// Run `custody produce --db <db> --topic <topic> more…`, which must
/// succeed; its stdout.
async fn produce(db: &str, topic: &str, more: &[&str]) -> anyhow::Result<String> {
    let args = [&["produce", "--db", db, "--topic", topic][..], more].concat();
    let (code, out, err) = custody(&args).await?;
    assert_eq!(code, 0, "custody {args:?}: {out}{err}");
    Ok(out)
}

/// `custody consume` reading the outbox of `outbox` directly into `db`.
fn consume_embedded<'a>(
    db: &'a str,
    outbox: &'a str,
    name: &'a str,
    handler: &'a str,
) -> Vec<&'a str> {
    vec![
        "consume",
        "--db",
        db,
        "--outbox",
        outbox,
        "--consumer-name",
        name,
        "--handler",
        handler,
    ]
}

/// A fresh directory for a test's SQLite files, removed when the test ends
/// (however it ends).
fn scratch(tag: &str) -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix(&format!("custody-{tag}-"))
        .tempdir()?)
}

fn path(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).to_string_lossy().into_owned()
}

/// A producer and a consumer database in `dir`: (a.db, b.db).
fn two_dbs(dir: &tempfile::TempDir) -> (String, String) {
    (path(dir, "a.db"), path(dir, "b.db"))
}

/// One JSON value per line of `out` (`--json` and the `print` handler).
fn json_lines(out: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    Ok(out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

async fn sqlite_count(db: &str, sql: &str) -> anyhow::Result<i64> {
    let pool = custody::sqlite::connect(db).await?;
    let n: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await?;
    pool.close().await;
    Ok(n)
}

#[tokio::test]
async fn sqlite_embedded_record_applies_each_message_once() -> anyhow::Result<()> {
    let dir = scratch("consume-sqlite")?;
    let (a, b) = two_dbs(&dir);

    let out = produce(
        &a,
        "orders",
        &[
            "--key",
            "customer-7",
            "--type",
            "OrderPlaced",
            "--json",
            r#"{"total": 990}"#,
            "--count",
            "50",
            "--batch",
            "20",
        ],
    )
    .await?;
    assert!(
        out.starts_with("enqueued 50 messages of topic orders"),
        "{out}"
    );
    // and one message of another topic, which the consumer must not take
    produce(&a, "other", &[]).await?;

    let mut consume = consume_embedded(&b, &a, "billing", "record:received");
    consume.extend(["--topic", "orders", "--max-messages", "50"]);
    let (code, out, err) = custody(&consume).await?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("processed 50,"), "{err}");
    assert_eq!(sqlite_count(&b, "SELECT count(*) FROM received").await?, 50);
    assert_eq!(
        sqlite_count(&b, "SELECT count(DISTINCT message_id) FROM received").await?,
        50
    );
    // the numbered copies 1..=50, each once, with their key and type
    assert_eq!(
        sqlite_count(
            &b,
            "SELECT count(DISTINCT json_extract(CAST(payload AS TEXT), '$.n')) FROM received \
             WHERE msg_key = 'customer-7' AND msg_type = 'OrderPlaced' AND topic = 'orders' \
             AND json_extract(CAST(payload AS TEXT), '$.total') = 990"
        )
        .await?,
        50
    );

    // Nothing new: a second run stops when idle and applies nothing.
    let mut idle = consume[..consume.len() - 2].to_vec();
    idle.extend(["--until-idle", "1s"]);
    let (code, out, err) = custody(&idle).await?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("processed 0,"), "{err}");

    // The reader's checkpoint lost: all 50 come again, and the inbox skips them.
    let producer = custody::sqlite::connect(&a).await?;
    let changed = sqlx::query("UPDATE custody_checkpoint SET position = 0 WHERE subscription = ?")
        .bind("billing")
        .execute(&producer)
        .await?
        .rows_affected();
    assert_eq!(
        changed, 1,
        "the embedded subscription keeps its checkpoint by consumer name"
    );
    producer.close().await;
    let (code, out, err) = custody(&consume).await?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("processed 0, duplicates skipped 50,"), "{err}");
    assert_eq!(sqlite_count(&b, "SELECT count(*) FROM received").await?, 50);
    Ok(())
}

#[tokio::test]
async fn print_writes_one_json_line_per_message_and_base64_for_bytes() -> anyhow::Result<()> {
    let dir = scratch("consume-print")?;
    let (a, b) = two_dbs(&dir);
    let json = r#"{"text":"héllo"}"#;
    let json_out = produce(
        &a,
        "t",
        &["--json", json, "--header", "correlationid=req-1"],
    )
    .await?;
    let bytes: Vec<u8> = vec![0xff, 0xfe, 0x00, b'A', 0x80];
    let file = path(&dir, "payload.bin");
    std::fs::write(&file, &bytes)?;
    let bin_out = produce(&a, "t", &["--type", "Blob", "--payload-file", &file]).await?;
    let (json_id, bin_id) = (json_out.trim(), bin_out.trim());
    assert_eq!(json_id.len(), 36, "{json_out}");

    let mut consume = consume_embedded(&b, &a, "printer", "print");
    consume.extend(["--max-messages", "2"]);
    let (code, out, err) = custody(&consume).await?;
    assert_eq!(code, 0, "{out}{err}");
    let lines = json_lines(&out)?;
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0]["id"], json_id);
    assert_eq!(lines[0]["topic"], "t");
    assert_eq!(lines[0]["key"], "test");
    assert_eq!(lines[0]["type"], "TestMessage");
    assert_eq!(lines[0]["content_type"], "application/json");
    assert_eq!(lines[0]["headers"]["correlationid"], "req-1");
    assert_eq!(lines[0]["payload_encoding"], "utf8");
    assert_eq!(lines[0]["payload"], r#"{"text":"héllo"}"#);
    assert_eq!(lines[1]["id"], bin_id);
    assert_eq!(lines[1]["type"], "Blob");
    assert_eq!(lines[1]["content_type"], "application/octet-stream");
    assert_eq!(lines[1]["payload_encoding"], "base64");
    assert_eq!(
        lines[1]["payload"],
        base64::engine::general_purpose::STANDARD.encode(&bytes)
    );
    assert!(err.contains("processed 2,"), "stats go to stderr: {err}");
    Ok(())
}

/// `custody consume --handler print | head -1`: the closed pipe stops the
/// consumer; nothing is dead-lettered for it.
#[tokio::test]
async fn print_to_a_closed_pipe_stops_without_dead_letters() -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let dir = scratch("consume-pipe")?;
    let (a, b) = two_dbs(&dir);
    // more than a pipe's buffer (64 KiB), so the writer meets the closed end
    let pad = format!(r#"{{"pad": "{}"}}"#, "x".repeat(1000));
    produce(&a, "t", &["--json", &pad, "--count", "300"]).await?;
    let mut child = command(&consume_embedded(&b, &a, "reader", "print"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut first = String::new();
    tokio::io::BufReader::new(stdout)
        .read_line(&mut first)
        .await?;
    assert!(first.contains(r#""topic":"t""#), "{first}");
    // the reader is dropped here: the pipe is closed
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    assert!(status.success(), "{status}");
    let (code, out, err) = custody(&["dlq", "list", "--db", &b, "--json"]).await?;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.trim(), "", "nothing dead-lettered for a closed pipe");
    Ok(())
}

#[tokio::test]
async fn bad_arguments_are_refused_with_a_clear_error() -> anyhow::Result<()> {
    let dir = scratch("consume-args")?;
    let (a, b) = two_dbs(&dir);
    for (handler, says) in [
        ("recrd:t", "print, record:<table> or http:<http(s) url>"),
        ("record:Bad-Name", "table name \"Bad-Name\" is not accepted"),
        ("record:custody_inbox", "reserved"),
        ("http:ftp://example.com/x", "not an http:// or https:// URL"),
    ] {
        let (code, out, err) = custody(&consume_embedded(&b, &a, "c", handler)).await?;
        assert_ne!(code, 0, "{handler}: {out}{err}");
        assert!(err.contains(says), "{handler}: {err}");
    }
    // no source
    let (code, _, err) = custody(&[
        "consume",
        "--db",
        &b,
        "--consumer-name",
        "c",
        "--handler",
        "print",
    ])
    .await?;
    assert_ne!(code, 0);
    assert!(err.contains("--nats") && err.contains("--outbox"), "{err}");
    // NATS flags without --nats would be ignored: refused
    let mut with_stream = consume_embedded(&b, &a, "c", "print");
    with_stream.extend(["--stream", "ORDERS"]);
    let (code, _, err) = custody(&with_stream).await?;
    assert_ne!(code, 0);
    assert!(err.contains("--nats"), "{err}");
    // a producer database that does not exist is not created
    let (code, _, err) = custody(&consume_embedded(&b, &a, "c", "print")).await?;
    assert_ne!(code, 0);
    assert!(err.contains("does not exist"), "{err}");
    assert!(!std::path::Path::new(&a).exists());
    // produce: invalid JSON, and a bad header name
    let (code, _, err) = custody(&["produce", "--db", &a, "--topic", "t", "--json", "{x"]).await?;
    assert_ne!(code, 0);
    assert!(err.contains("is not valid JSON"), "{err}");
    let (code, _, err) =
        custody(&["produce", "--db", &a, "--topic", "t", "--header", "Bad=1"]).await?;
    assert_ne!(code, 0);
    assert!(err.contains("Bad"), "{err}");
    Ok(())
}

/// What the test endpoint saw: per message id, the attempts and whether it
/// was accepted, with the headers of the accepted request.
#[derive(Default)]
struct Seen {
    attempts: HashMap<String, u32>,
    accepted: Vec<(String, HashMap<String, String>, Vec<u8>)>,
}

async fn hook(
    axum::extract::State(seen): axum::extract::State<Arc<Mutex<Seen>>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> (axum::http::StatusCode, String) {
    let h: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_owned()))
        .collect();
    let id = h.get("ce-id").cloned().unwrap_or_default();
    let Ok(mut seen) = seen.lock() else {
        return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, String::new());
    };
    let n = {
        let n = seen.attempts.entry(id.clone()).or_default();
        *n += 1;
        *n
    };
    match h.get("ce-type").map(String::as_str) {
        Some("Flaky") if n < 3 => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "busy".to_owned(),
        ),
        Some("Bad") => (
            axum::http::StatusCode::BAD_REQUEST,
            "no such order: 42".to_owned(),
        ),
        _ => {
            seen.accepted.push((id, h, body.to_vec()));
            (axum::http::StatusCode::OK, "ok".to_owned())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_retries_transient_statuses_and_dead_letters_refusals() -> anyhow::Result<()> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = scratch("consume-http")?;
    let (a, b) = two_dbs(&dir);
    let mut ids = HashMap::new();
    for t in ["Flaky", "Bad", "Good"] {
        let more = ["--key", "order 7\n", "--type", t, "--json", r#"{"id": 7}"#];
        let out = produce(&a, "orders", &more).await?;
        ids.insert(t, out.trim().to_owned());
    }
    let url = format!("http:http://{addr}/hook");
    let mut consume = consume_embedded(&b, &a, "webhook", &url);
    consume.extend(["--max-messages", "3"]);
    let (code, out, err) = custody(&consume).await?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("processed 2,"), "{err}");
    assert!(err.contains("dead-lettered 1,"), "{err}");
    {
        let seen = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        assert_eq!(
            seen.attempts.get(&ids["Flaky"]),
            Some(&3),
            "500 twice, then 200"
        );
        assert_eq!(
            seen.attempts.get(&ids["Bad"]),
            Some(&1),
            "400 is not retried"
        );
        assert_eq!(seen.attempts.get(&ids["Good"]), Some(&1));
        let accepted: Vec<&str> = seen.accepted.iter().map(|(id, _, _)| id.as_str()).collect();
        assert_eq!(accepted, [ids["Flaky"].as_str(), ids["Good"].as_str()]);
        let (id, h, body) = &seen.accepted[1];
        assert_eq!(h.get("idempotency-key"), Some(id));
        assert_eq!(h.get("ce-specversion").map(String::as_str), Some("1.0"));
        assert_eq!(h.get("ce-type").map(String::as_str), Some("Good"));
        assert_eq!(h.get("ce-source").map(String::as_str), Some("custody"));
        assert_eq!(
            h.get("ce-subject").map(String::as_str),
            Some("order%207%0A")
        );
        assert_eq!(h.get("ce-custodytopic").map(String::as_str), Some("orders"));
        assert_eq!(
            h.get("content-type").map(String::as_str),
            Some("application/json")
        );
        assert_eq!(body.as_slice(), br#"{"id": 7}"#);
    }
    // the refused one is a dead letter with the status and the body's start
    let (code, out, err) = custody(&["dlq", "list", "--db", &b, "--json"]).await?;
    assert_eq!(code, 0, "{out}{err}");
    let dead = json_lines(&out)?;
    assert_eq!(dead.len(), 1, "{out}");
    assert_eq!(dead[0]["message_id"], ids["Bad"].as_str());
    assert_eq!(dead[0]["origin"], "consumer:webhook");
    let error = dead[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("400") && error.contains("no such order: 42"),
        "{error}"
    );
    server.abort();
    Ok(())
}

async fn pg_count(url: &str, sql: &str) -> anyhow::Result<i64> {
    let pool = sqlx::PgPool::connect(url).await?;
    let n = sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(&pool)
        .await
        .unwrap_or(0);
    pool.close().await;
    Ok(n)
}

/// The consumer killed with SIGKILL mid-run and started again: every
/// message is in the table exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_nats_consumer_killed_mid_run_applies_each_message_once() -> anyhow::Result<()> {
    let Some(nats) = custody_testkit::nats().await? else {
        return Ok(());
    };
    let Some(producer) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let Some(consumer) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let stream = custody_testkit::unique_name("CONSUME");
    let prefix = custody_testkit::unique_name("consume");
    const TOTAL: i64 = 3000;
    let total = TOTAL.to_string();
    produce(
        &producer.url,
        "orders",
        &["--json", "{}", "--count", &total],
    )
    .await?;
    let nats_args = [
        "--nats",
        &nats,
        "--stream",
        &stream,
        "--subject-prefix",
        &prefix,
    ];
    let relay_args = [&["relay", "--db", &producer.url][..], &nats_args].concat();
    let mut relay = Proc::spawn("relay", command(&relay_args))?;
    let consume = [
        &[
            "consume",
            "--db",
            &consumer.url,
            "--consumer-name",
            "billing",
        ][..],
        &["--topic", "orders", "--handler", "record:received"],
        &nats_args,
    ]
    .concat();
    let count = || pg_count(&consumer.url, "SELECT count(*) FROM received");
    let result = async {
        let mut first = Proc::spawn("first consumer", command(&consume))?;
        let every = Duration::from_millis(20);
        let at_kill = poll_until(Duration::from_secs(60), every, count, |n| *n > 0).await?;
        first.kill().await?; // SIGKILL
        assert!(
            at_kill > 0,
            "the first consumer applied nothing within 60 s"
        );
        eprintln!("consumer killed after {at_kill} of {TOTAL} rows");

        let mut second = Proc::spawn("second consumer", command(&consume))?;
        let every = Duration::from_millis(100);
        let n = poll_until(Duration::from_secs(90), every, count, |n| *n >= TOTAL).await?;
        assert_eq!(n, TOTAL, "every message applied after the restart");
        // a little longer: nothing applied twice arrives late
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(count().await?, TOTAL);
        assert_eq!(
            pg_count(
                &consumer.url,
                "SELECT count(DISTINCT message_id) FROM received"
            )
            .await?,
            TOTAL
        );
        // SIGTERM: graceful stop, exit 0, counters printed
        second.terminate().await?;
        second
            .wait_line("consume stopped: processed", Duration::from_secs(5))
            .await?;
        anyhow::Ok(())
    }
    .await;
    let _ = relay.kill().await;
    if let Ok(client) = async_nats::connect(&nats).await {
        let _ = async_nats::jetstream::new(client)
            .delete_stream(&stream)
            .await;
    }
    result
}

/// The embedded transport on PostgreSQL: a consumer reads the producer's
/// outbox directly, into a SQLite consumer database.
#[tokio::test]
async fn postgres_embedded_record_into_sqlite() -> anyhow::Result<()> {
    let Some(producer) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let dir = scratch("consume-pg-embedded")?;
    let b = path(&dir, "b.db");
    produce(&producer.url, "orders", &["--count", "25", "--batch", "10"]).await?;
    let mut consume = consume_embedded(&b, &producer.url, "audit", "record:seen");
    consume.extend(["--max-messages", "25"]);
    let (code, out, err) = custody(&consume).await?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("processed 25,"), "{err}");
    assert_eq!(
        sqlite_count(&b, "SELECT count(DISTINCT message_id) FROM seen").await?,
        25
    );
    assert_eq!(sqlite_count(&b, "SELECT count(*) FROM seen").await?, 25);
    Ok(())
}
