//! The `custody reconcile | trace | dlq` commands as a user runs them: the
//! real binary on real SQLite files, exit statuses and JSON checked.

use std::process::Command;
use std::time::Duration;

use custody::sqlite::{SqliteEmbeddedSubscriber, SqliteInbox, SqliteOutbox};
use custody::{Consumer, ConsumerConfig, Handler, HandlerError, Message};

struct Apply;

impl Handler<sqlx::Transaction<'static, sqlx::Sqlite>> for Apply {
    async fn handle(
        &self,
        _tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        msg: &Message,
    ) -> Result<(), HandlerError> {
        if msg.message_type == "Step" {
            Ok(())
        } else {
            Err(HandlerError::UnknownType(msg.message_type.clone()))
        }
    }
}

fn custody(args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_custody"))
        .args(args)
        .env("CUSTODY_LOG", "error")
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

async fn consume(a: &sqlx::SqlitePool, b: &sqlx::SqlitePool) -> anyhow::Result<()> {
    let sub = SqliteEmbeddedSubscriber::new(a.clone(), "billing", &["steps".to_owned()]).await?;
    let mut cfg = ConsumerConfig::new("billing");
    cfg.fetch_wait = Duration::from_millis(20);
    let mut c = Consumer::new(SqliteInbox::new(b.clone()), sub, Apply, cfg);
    while c.run_once().await? > 0 {}
    Ok(())
}

#[tokio::test]
async fn reconcile_trace_and_dlq_commands() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("custody-ops-cli-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir)?;
    let a_path = dir.join("a.db").to_string_lossy().into_owned();
    let b_path = dir.join("b.db").to_string_lossy().into_owned();
    let a = custody::sqlite::connect(&a_path).await?;
    let b = custody::sqlite::connect(&b_path).await?;
    custody::sqlite::migrate(&a).await?;
    custody::sqlite::migrate(&b).await?;
    let outbox = SqliteOutbox::new(a.clone());
    let mut msgs = Vec::new();
    for i in 0..20 {
        msgs.push(
            Message::builder("steps", format!("k{}", i % 3), "Step")
                .json(&i)?
                .build()?,
        );
    }
    msgs.push(
        Message::builder("steps", "k", "Unknown")
            .json(&0)?
            .build()?,
    );
    msgs.push(
        Message::builder("steps", "k", "Unknown")
            .json(&1)?
            .build()?,
    );
    let mut tx = a.begin().await?;
    outbox.enqueue_batch(&mut tx, &msgs).await?;
    tx.commit().await?;
    consume(&a, &b).await?;

    let base = [
        "reconcile",
        "--producer",
        &a_path,
        "--consumer",
        &b_path,
        "--consumer-name",
        "billing",
        "--topic",
        "steps",
        "--to",
        "0s",
    ];
    let (code, out, err) = custody(&base)?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("RESULT: OK"), "{out}");

    // lose two deliveries
    let lost = [msgs[4].id.to_string(), msgs[11].id.to_string()];
    for id in &lost {
        sqlx::query("DELETE FROM custody_inbox WHERE message_id = ?")
            .bind(id)
            .execute(&b)
            .await?;
    }
    let mut json_args = base.to_vec();
    json_args.push("--json");
    let (code, out, err) = custody(&json_args)?;
    assert_eq!(code, 1, "missing ids → exit 1: {out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let mut missing: Vec<String> = v["missing"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    missing.sort();
    let mut want = lost.to_vec();
    want.sort();
    assert_eq!(missing, want);
    assert_eq!(v["dead_lettered"].as_array().map(Vec::len), Some(2));

    // trace: a lost one is only enqueued; a processed one is processed
    let (code, out, _) = custody(&[
        "trace", &lost[0], "--db", &a_path, "--db", &b_path, "--json",
    ])?;
    assert_eq!(code, 0);
    let t: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(t["stage"], "pending", "{out}");
    let (_, out, _) = custody(&[
        "trace",
        &msgs[0].id.to_string(),
        "--db",
        &a_path,
        "--db",
        &b_path,
    ])?;
    assert!(out.contains(": processed"), "{out}");
    let (code, _, err) = custody(&["trace", "not-an-id", "--db", &a_path])?;
    assert_ne!(code, 0);
    assert!(err.contains("is not a message id"), "{err}");

    // repair through the embedded transport: rewind, run the consumer, clean
    let mut repair = base.to_vec();
    repair.extend([
        "--repair",
        "--embedded-subscription",
        "billing",
        "--repair-wait",
        "1s",
    ]);
    let (code, out, err) = custody(&repair)?;
    assert_eq!(code, 1, "no consumer ran yet: {out}{err}");
    assert!(out.contains("rewound subscription"), "{out}");
    consume(&a, &b).await?;
    let (code, out, err) = custody(&base)?;
    assert_eq!(code, 0, "{out}{err}");

    // dlq: bulk needs confirmation; dry run changes nothing; redrive by filter with --yes
    let (code, out, _) = custody(&[
        "dlq",
        "list",
        "--db",
        &b_path,
        "--error",
        "UNKNOWN MESSAGE TYPE",
    ])?;
    assert_eq!(code, 0);
    assert!(out.contains("2 dead letter(s)"), "{out}");
    let (code, _, err) = custody(&["dlq", "redrive", "--all", "--db", &b_path])?;
    assert_ne!(code, 0);
    assert!(err.contains("--yes"), "{err}");
    let (code, out, _) = custody(&[
        "dlq",
        "redrive",
        "--consumer",
        "billing",
        "--db",
        &b_path,
        "--dry-run",
    ])?;
    assert_eq!(code, 0);
    assert!(out.contains("would redrive 2"), "{out}");
    let (code, out, _) = custody(&[
        "dlq",
        "redrive",
        "--consumer",
        "billing",
        "--db",
        &b_path,
        "--yes",
    ])?;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("redriven: 2 back to their consumer"), "{out}");
    let (_, out, _) = custody(&["dlq", "list", "--db", &b_path])?;
    assert!(out.contains("0 dead letter(s)"), "{out}");
    // the consumer takes them again (and, still unknown, dead-letters them again)
    consume(&a, &b).await?;
    let (_, out, _) = custody(&["dlq", "list", "--db", &b_path])?;
    assert!(out.contains("2 dead letter(s)"), "{out}");
    let (code, out, _) = custody(&["dlq", "purge", &msgs[20].id.to_string(), "--db", &b_path])?;
    assert_eq!(code, 0);
    assert!(out.contains("purged 1"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
