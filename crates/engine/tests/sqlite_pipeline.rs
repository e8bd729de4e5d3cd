//! End to end on embedded SQLite: producer outbox → embedded transport →
//! consumer inbox, with no services needed.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{step_message, verdict, Recorder, EFFECTS_SQLITE};
use custody_core::{Message, CONTENT_TYPE_JSON};
use custody_engine::{CancellationToken, Consumer, ConsumerConfig};
use custody_sqlite::{SqliteEmbeddedSubscriber, SqliteInbox, SqliteOutbox};
use sqlx::{Row, SqlitePool};

struct Pair {
    _dir: tempfile::TempDir,
    a: SqlitePool,
    b: SqlitePool,
    outbox: SqliteOutbox,
}

async fn pair() -> anyhow::Result<Pair> {
    let dir = tempfile::tempdir()?;
    let a = custody_sqlite::connect(dir.path().join("a.db").to_str().unwrap_or_default()).await?;
    let b = custody_sqlite::connect(dir.path().join("b.db").to_str().unwrap_or_default()).await?;
    custody_sqlite::migrate(&a).await?;
    custody_sqlite::migrate(&b).await?;
    sqlx::query(EFFECTS_SQLITE).execute(&b).await?;
    Ok(Pair {
        outbox: SqliteOutbox::new(a.clone()),
        _dir: dir,
        a,
        b,
    })
}

async fn effects(b: &SqlitePool) -> anyhow::Result<Vec<(String, String, i64)>> {
    let rows = sqlx::query("SELECT message_id, k, seq FROM effects ORDER BY n")
        .fetch_all(b)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect()
}

async fn consumer(
    p: &Pair,
    handler: Recorder,
) -> anyhow::Result<Consumer<SqliteInbox, SqliteEmbeddedSubscriber, Recorder>> {
    let sub = SqliteEmbeddedSubscriber::new(p.a.clone(), "billing", &["steps".to_owned()])
        .await?
        .with_poll_interval(Duration::from_millis(10));
    let mut cfg = ConsumerConfig::new("billing");
    cfg.fetch_wait = Duration::from_millis(50);
    Ok(Consumer::new(
        SqliteInbox::new(p.b.clone()),
        sub,
        handler,
        cfg,
    ))
}

#[tokio::test]
async fn rollback_sends_nothing_commit_sends_exactly_one_and_malformed_is_dead_lettered(
) -> anyhow::Result<()> {
    let p = pair().await?;
    // rolled back: must never reach B
    let mut tx = p.a.begin().await?;
    let phantom = step_message("steps", "k1", 1);
    p.outbox.enqueue(&mut tx, &phantom).await?;
    tx.rollback().await?;
    // committed
    let mut tx = p.a.begin().await?;
    let m1 = step_message("steps", "k1", 1);
    p.outbox.enqueue(&mut tx, &m1).await?;
    tx.commit().await?;
    // malformed, then more good ones after it
    let mut tx = p.a.begin().await?;
    let bad = Message::builder("steps", "k2", "Step")
        .payload(CONTENT_TYPE_JSON, b"{\"key\": ".to_vec())
        .build()?;
    p.outbox.enqueue(&mut tx, &bad).await?;
    let later = vec![
        step_message("steps", "k1", 2),
        step_message("steps", "k2", 1),
    ];
    p.outbox.enqueue_batch(&mut tx, &later).await?;
    tx.commit().await?;

    let mut c = consumer(&p, Recorder::default()).await?;
    while c.run_once().await? > 0 {}
    let eff = effects(&p.b).await?;
    let ids: Vec<&str> = eff.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        vec![
            m1.id.to_string(),
            later[0].id.to_string(),
            later[1].id.to_string()
        ]
    );
    assert!(!ids.contains(&phantom.id.to_string().as_str()));
    let dead = custody_sqlite::dead_letters(&p.b).await?;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].message_id, Some(bad.id));
    assert!(dead[0].error.contains("cannot decode"), "{}", dead[0].error);
    assert_eq!(c.stats().processed, 3);
    assert_eq!(c.stats().dead_lettered, 1);
    Ok(())
}

#[tokio::test]
async fn consumer_killed_between_handler_and_commit_applies_effect_once() -> anyhow::Result<()> {
    let p = pair().await?;
    let msgs: Vec<Message> = (1..=5).map(|i| step_message("steps", "k", i)).collect();
    let mut tx = p.a.begin().await?;
    p.outbox.enqueue_batch(&mut tx, &msgs).await?;
    tx.commit().await?;

    // first consumer: its handler writes the effect of message 1, then the
    // consumer dies before the commit
    let rec = Recorder::default();
    rec.hang_after_effect.store(true, Ordering::SeqCst);
    let reached = rec.reached.clone();
    let c = consumer(&p, rec).await?;
    let task = tokio::spawn(c.run(CancellationToken::new()));
    tokio::time::timeout(Duration::from_secs(10), reached.notified()).await?;
    task.abort();
    let _ = task.await;
    assert!(
        effects(&p.b).await?.is_empty(),
        "uncommitted effect visible"
    );

    // restart
    let mut c = consumer(&p, Recorder::default()).await?;
    while c.run_once().await? > 0 {}
    let eff = effects(&p.b).await?;
    let v = verdict(&eff);
    assert_eq!(v.applied, 5);
    assert_eq!(v.distinct, 5);
    assert_eq!(v.order_violations, 0);

    // a redelivery of everything (checkpoint rewound) changes nothing
    custody_sqlite::set_checkpoint(&p.a, "billing", 0).await?;
    let mut c = consumer(&p, Recorder::default()).await?;
    while c.run_once().await? > 0 {}
    assert_eq!(effects(&p.b).await?.len(), 5);
    assert_eq!(c.stats().duplicates, 5);
    Ok(())
}

#[tokio::test]
async fn a_failing_handler_inside_a_group_commit_leaves_the_others_applied_once(
) -> anyhow::Result<()> {
    let p = pair().await?;
    let poison = Message::builder("steps", "k", "NotAStep")
        .json(&serde_json::json!({"x": 1}))?
        .build()?;
    let msgs = vec![
        step_message("steps", "k", 1),
        step_message("steps", "k", 2),
        poison.clone(),
        step_message("steps", "k", 3),
        step_message("steps", "k", 4),
    ];
    let mut tx = p.a.begin().await?;
    p.outbox.enqueue_batch(&mut tx, &msgs).await?;
    tx.commit().await?;
    let mut c = consumer(&p, Recorder::default()).await?;
    while c.run_once().await? > 0 {}
    let eff = effects(&p.b).await?;
    let v = verdict(&eff);
    assert_eq!((v.applied, v.distinct, v.order_violations), (4, 4, 0));
    let dead = custody_sqlite::dead_letters(&p.b).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, Some(poison.id));
    assert_eq!((c.stats().processed, c.stats().dead_lettered), (4, 1));
    // everything acked: the checkpoint is at the last message
    let cp = custody_sqlite::checkpoint(&p.a, "billing")
        .await?
        .unwrap_or(0);
    let last: i64 = sqlx::query_scalar("SELECT MAX(position) FROM custody_outbox")
        .fetch_one(&p.a)
        .await?;
    assert_eq!(cp, last);
    Ok(())
}
