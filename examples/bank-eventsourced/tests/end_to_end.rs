//! The example run as a user runs it: `bank` as a process per command on one
//! database file. Open, deposit, a refused withdrawal, a command run twice
//! with one command id (applied once), an event written by an older build
//! (Deposited v1, upcast on read), snapshots, and eight processes depositing
//! at once (conflicts retried across processes, each deposit applied once).

use std::time::Duration;

use anyhow::Context;
use custody::event::{Direction, EventData, EventStore, ExpectedVersion};
use serde_json::Value;

struct Run {
    code: i32,
    out: Value,
}

async fn bank(db: &str, args: &[&str]) -> anyhow::Result<Run> {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bank"))
        .arg("--db")
        .arg(db)
        .args(["--snapshot-every", "4"])
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .with_context(|| format!("bank {args:?} still running after 60 s"))??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let code = output.status.code().unwrap_or(-1);
    let out = serde_json::from_str(stdout.trim()).with_context(|| {
        format!("bank {args:?} exited {code}, printed {stdout:?}, stderr {stderr}")
    })?;
    Ok(Run { code, out })
}

async fn balance(db: &str, id: &str) -> anyhow::Result<Value> {
    let run = bank(db, &["show", id]).await?;
    anyhow::ensure!(run.code == 0, "show {id}: {}", run.out);
    Ok(run.out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_lives_through_processes_and_schema_versions() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bank.db");
    let db = db.to_str().context("temp path is not UTF-8")?;

    let opened = bank(db, &["open", "7", "ada"]).await?;
    assert_eq!(opened.code, 0, "{}", opened.out);
    assert_eq!(opened.out["result"]["version"], 1);

    // An older build wrote deposits as {"amount": …} (schema version 1).
    let pool = custody::sqlite::connect(db).await?;
    let store = custody::sqlite::SqliteEventStore::new(pool.clone());
    let old =
        EventData::json("Deposited", &serde_json::json!({ "amount": 250 }))?.schema_version(1);
    let outcome = store
        .append("account-7", ExpectedVersion::Exact(1), vec![old])
        .await?;
    anyhow::ensure!(outcome.appended().is_some(), "{outcome:?}");

    let deposit = bank(db, &["deposit", "7", "500"]).await?;
    assert_eq!(
        (deposit.code, &deposit.out["result"]["version"]),
        (0, &Value::from(3))
    );
    let shown = balance(db, "7").await?;
    assert_eq!(
        shown["state"]["balance"], 750,
        "the v1 deposit counts: {shown}"
    );

    let refused = bank(db, &["withdraw", "7", "1000"]).await?;
    assert_eq!(refused.code, 3, "{}", refused.out);
    assert_eq!(
        refused.out["result"]["rejection"],
        serde_json::json!({ "InsufficientFunds": { "balance": 750, "requested": 1000 } })
    );

    // the same command twice (a client retrying after a lost answer)
    let command_id = uuid::Uuid::now_v7().to_string();
    let first = bank(db, &["withdraw", "7", "100", "--command-id", &command_id]).await?;
    let second = bank(db, &["withdraw", "7", "100", "--command-id", &command_id]).await?;
    assert_eq!((first.code, second.code), (0, 0));
    assert_eq!(first.out["result"]["idempotent"], false);
    assert_eq!(second.out["result"]["idempotent"], true, "{}", second.out);
    assert_eq!(
        second.out["result"]["version"],
        first.out["result"]["version"]
    );
    let shown = balance(db, "7").await?;
    assert_eq!(shown["state"]["balance"], 650, "withdrawn once: {shown}");
    assert_eq!(shown["version"], 4);
    // version 4 crossed --snapshot-every 4: the load starts from it
    assert_eq!(shown["snapshot_version"], 4, "{shown}");
    assert_eq!(shown["events_read"], 0, "{shown}");

    // eight processes deposit at once: every deposit applied once
    let mut runs = Vec::new();
    for n in 1..=8 {
        let cents = (n * 10).to_string();
        runs.push(async move { bank(db, &["deposit", "7", &cents]).await });
    }
    let mut conflicts = 0;
    // polled together: the eight processes overlap
    for run in futures::future::join_all(runs).await {
        let run = run?;
        assert_eq!(run.code, 0, "{}", run.out);
        conflicts += run.out["result"]["conflicts"].as_u64().unwrap_or(0);
    }
    let shown = balance(db, "7").await?;
    assert_eq!(shown["state"]["balance"], 650 + 360, "{shown}");
    assert_eq!(shown["version"], 12);
    assert_eq!(shown["snapshot_version"], 12, "{shown}");
    println!("conflicts retried across 8 processes: {conflicts}");

    let stored = store
        .read_stream("account-7", Direction::Forward, 1, 100)
        .await?;
    assert_eq!(stored.events.len(), 12, "one event per applied command");
    assert_eq!(
        stored.events[1].schema_version, 1,
        "stored events are never rewritten; upcasting happens on read"
    );
    pool.close().await;
    Ok(())
}
