//! `custody reconcile --live` as a user runs it: the real binary on two real
//! SQLite files (a producer's outbox numbered as the relay numbers it, a
//! consumer's inbox missing some numbers), exit statuses, JSON and the
//! repair's effect on the producer's database checked.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use chrono::{SubsecRound, Utc};
use custody::sqlite::{SqliteInbox, SqliteOutbox};
use custody::{
    partition_for, InboxOutcome, InboxStore, Message, OutboxRecord, OutboxStore, PublishAck,
    Sequence,
};
use uuid::Uuid;

const PARTITIONS: u32 = 2;
const RELAY: &str = "r";

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

/// The first `n` keys `k0`, `k1`, … that fall in `partition`.
fn keys_in(partition: u32, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("k{i}"))
        .filter(|k| partition_for(k, PARTITIONS) == partition)
        .take(n)
        .collect()
}

/// `(kind, id)` of each entry of a report's `missing` (no id: unresolved).
fn missing_of(report: &serde_json::Value) -> BTreeSet<(String, Option<String>)> {
    report["missing"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    (
                        m["kind"].as_str().unwrap_or("?").to_owned(),
                        m["id"].as_str().map(str::to_owned),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn id_of(id: Uuid) -> Option<String> {
    Some(id.to_string())
}

async fn record(inbox: &SqliteInbox, m: &Message, at: chrono::DateTime<Utc>) -> anyhow::Result<()> {
    let mut tx = inbox.begin().await?;
    let out = inbox.record(&mut tx, "billing", m, at).await?;
    inbox.commit(tx).await?;
    assert_eq!(out, InboxOutcome::New, "{}", m.id);
    Ok(())
}

#[tokio::test]
async fn reconcile_live_reports_repairs_and_clears_lost_numbers() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("custody-live-cli-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir)?;
    let a_path = dir.join("a.db").to_string_lossy().into_owned();
    let b_path = dir.join("b.db").to_string_lossy().into_owned();
    let a = custody::sqlite::connect(&a_path).await?;
    let b = custody::sqlite::connect(&b_path).await?;
    custody::sqlite::migrate(&a).await?;
    custody::sqlite::migrate(&b).await?;
    let outbox = SqliteOutbox::new(a.clone()).with_partitions(PARTITIONS);
    let inbox = SqliteInbox::new(b.clone());

    // Partition 0 gets numbers 1..=5, partition 1 numbers 1..=4, all
    // published a second ago, numbered and stamped as the relay does.
    let mut msgs = Vec::new();
    for (p, n) in [(0u32, 5u64), (1, 4)] {
        let keys = keys_in(p, 2);
        for i in 0..n {
            msgs.push(
                Message::builder("orders", keys[(i % 2) as usize].as_str(), "Order")
                    .json(&i)?
                    .build()?,
            );
        }
    }
    let mut tx = a.begin().await?;
    outbox.enqueue_batch(&mut tx, &msgs).await?;
    tx.commit().await?;
    let t0 = Utc::now().trunc_subsecs(3) - chrono::Duration::seconds(1);
    let all: Vec<u32> = (0..PARTITIONS).collect();
    outbox
        .acquire_leases(RELAY, Duration::from_secs(600), t0)
        .await?;
    let mut batch = outbox.fetch_batch(&all, 100, t0).await?;
    outbox.assign_sequences(RELAY, &mut batch, t0).await?;
    assert_eq!(batch.len(), msgs.len());
    let producer = outbox
        .producer_id()
        .await?
        .ok_or_else(|| anyhow::anyhow!("sqlite outboxes number messages"))?;
    for r in &mut batch {
        let seq = r
            .sequence
            .ok_or_else(|| anyhow::anyhow!("position {} not numbered", r.position))?;
        Sequence {
            producer: producer.clone(),
            topic: r.message.topic.clone(),
            partition: r.partition,
            seq,
        }
        .stamp(&mut r.message);
    }
    let acked: Vec<(i64, PublishAck)> = batch
        .iter()
        .map(|r| (r.position, PublishAck::default()))
        .collect();
    assert_eq!(
        outbox.mark_published(RELAY, &acked, t0).await? as usize,
        batch.len()
    );
    let by_number = |p: u32, seq: u64| -> anyhow::Result<&OutboxRecord> {
        batch
            .iter()
            .find(|r| r.partition == p && r.sequence == Some(seq))
            .ok_or_else(|| anyhow::anyhow!("no #{seq} in partition {p}"))
    };

    // Lost: 0/#2 (a hole: #3 arrived) and 0/#5, 1/#3, 1/#4 (the tail).
    let hole = by_number(0, 2)?.message.id;
    let tail = [
        by_number(0, 5)?.message.id,
        by_number(1, 3)?.message.id,
        by_number(1, 4)?.message.id,
    ];
    let lost: BTreeSet<Uuid> = tail.iter().copied().chain([hole]).collect();
    for r in batch.iter().filter(|r| !lost.contains(&r.message.id)) {
        record(&inbox, &r.message, t0).await?;
    }

    let with_producer = [
        "reconcile",
        "--live",
        "--producer",
        &a_path,
        "--consumer",
        &b_path,
        "--consumer-name",
        "billing",
        "--grace",
        "0s",
    ];
    let json = |extra: &[&'static str],
                base: &[&str]|
     -> anyhow::Result<(i32, serde_json::Value, String)> {
        let mut args = base.to_vec();
        args.push("--json");
        args.extend_from_slice(extra);
        let (code, out, err) = custody(&args)?;
        let v = serde_json::from_str(&out)
            .map_err(|e| anyhow::anyhow!("not JSON ({e}): {out}{err}"))?;
        Ok((code, v, format!("{out}{err}")))
    };

    // 1. Every lost number, resolved to its message, with its kind.
    let (code, v, out) = json(&[], &with_producer)?;
    assert_eq!(code, 1, "missing numbers → exit 1: {out}");
    let mut want: BTreeSet<(String, Option<String>)> = tail
        .iter()
        .map(|id| ("tail".to_owned(), id_of(*id)))
        .collect();
    want.insert(("hole".to_owned(), id_of(hole)));
    assert_eq!(missing_of(&v), want, "{out}");
    assert_eq!(v["producer"], serde_json::Value::String(producer.clone()));
    assert!(
        v["missing"]
            .as_array()
            .is_some_and(|a| a.iter().all(|m| m["outbox_status"] == "published")),
        "{out}"
    );
    let (code, table, err) = custody(&with_producer)?;
    assert_eq!(code, 1, "{table}{err}");
    println!("{table}");
    assert!(table.contains("RESULT: 4 MISSING"), "{table}");

    // 2. Without the producer: the hole only, by number (no id).
    let without_producer = [
        "reconcile",
        "--live",
        "--consumer",
        &b_path,
        "--consumer-name",
        "billing",
        "--grace",
        "0s",
    ];
    let (code, v, out) = json(&[], &without_producer)?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(missing_of(&v), [("hole".to_owned(), None)].into(), "{out}");
    assert_eq!(v["missing"][0]["partition"], 0, "{out}");
    assert_eq!(v["missing"][0]["seq"], 2, "{out}");

    // 3. Repair: the lost rows go back to pending for the relay (none runs
    // here, so the gaps stay open and the exit status stays 1).
    let (code, v, out) = json(&["--repair", "--repair-wait", "2s"], &with_producer)?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(missing_of(&v["before"]), want, "{out}");
    assert!(
        v["repair"]
            .as_str()
            .is_some_and(|s| s.starts_with("put 4 of 4 missing messages back to pending")),
        "{out}"
    );
    let after = missing_of(&v["after"]);
    assert!(after.iter().all(|m| want.contains(m)), "{out}");
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT id, status FROM custody_outbox ORDER BY position")
            .fetch_all(&a)
            .await?;
    for (id, status) in &statuses {
        let id = Uuid::parse_str(id)?;
        let expected = if lost.contains(&id) { 0 } else { 1 };
        assert_eq!(*status, expected, "{id}: {out}");
    }
    // They keep their numbers (a republish is the same message, same number).
    let renumbered: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM custody_outbox WHERE status = 0 AND seq IS NOT NULL",
    )
    .fetch_one(&a)
    .await?;
    assert_eq!(renumbered, 4);

    // 4. The republished messages arrive: clean.
    for r in batch.iter().filter(|r| lost.contains(&r.message.id)) {
        record(&inbox, &r.message, Utc::now()).await?;
    }
    let (code, table, err) = custody(&with_producer)?;
    assert_eq!(code, 0, "{table}{err}");
    assert!(table.contains("RESULT: OK"), "{table}");
    let (code, table, err) = custody(&without_producer)?;
    assert_eq!(code, 0, "{table}{err}");
    assert!(table.contains("RESULT: OK"), "{table}");

    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// Issue 11, scenario 5: `custody reconcile --live --accept` raises the floor
/// past a named gap with an audit record; a range that would swallow
/// another missing number is refused (an error, nothing written);
/// afterwards the check is clean.
#[tokio::test]
async fn reconcile_live_accept_raises_the_floor_past_a_named_gap() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("billing.db");
    let db = path.to_string_lossy().into_owned();
    let pool = custody::sqlite::connect(&db).await?;
    custody::sqlite::migrate(&pool).await?;
    let inbox = SqliteInbox::new(pool.clone());
    let old = Utc::now().trunc_subsecs(3) - chrono::Duration::hours(1);
    for seq in [1, 2, 5, 8] {
        let mut m = Message::builder("orders", "k", "T").json(&seq)?.build()?;
        Sequence {
            producer: "p1".into(),
            topic: "orders".into(),
            partition: 0,
            seq,
        }
        .stamp(&mut m);
        record(&inbox, &m, old).await?;
    }
    let base = [
        "reconcile",
        "--live",
        "--consumer",
        &db,
        "--consumer-name",
        "billing",
        "--grace",
        "0s",
    ];
    let (code, out, _) = custody(&base)?;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("missing: 4"), "{out}");

    // 4-7 leaves 3 unnamed below the new floor: refused, nothing written
    let mut refused = base.to_vec();
    refused.extend([
        "--accept",
        "orders/0/4-7",
        "--reason",
        "lost to max_age",
        "--accepted-by",
        "ops",
    ]);
    let (code, out, err) = custody(&refused)?;
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("missing numbers 3 outside 4-7"), "{err}");
    let audit: i64 = sqlx::query_scalar("SELECT count(*) FROM custody_gap_accepted")
        .fetch_one(&pool)
        .await?;
    assert_eq!(audit, 0);

    let mut ok = base.to_vec();
    ok.extend([
        "--accept",
        "orders/0/3-7",
        "--reason",
        "lost to max_age",
        "--accepted-by",
        "ops",
    ]);
    let (code, out, err) = custody(&ok)?;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("accepted as lost: 4 number(s) 3-4, 6-7"),
        "{out}"
    );
    assert!(out.contains("RESULT: OK"), "{out}");
    let rows: Vec<(String, i64, i64, String, String)> = sqlx::query_as(
        "SELECT numbers, old_floor, new_floor, accepted_by, reason FROM custody_gap_accepted",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        rows,
        vec![(
            "3-4, 6-7".into(),
            0,
            7,
            "ops".into(),
            "lost to max_age".into()
        )]
    );
    Ok(())
}
