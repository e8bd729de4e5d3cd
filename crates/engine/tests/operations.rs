//! Message status / trace at each stage, dead-letter redrive through the
//! consumer (processed exactly once) and through the relay, inbox pruning.
//! Real SQLite files and a real PostgreSQL database; failures are real
//! (a handler that fails, a publisher that refuses a message).

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use common::{step_message, EFFECTS_PG, EFFECTS_SQLITE};
use custody_core::{
    Error, Handler, HandlerError, InboxStore, Message, MessageStatus, PublishAck, Publisher, Stage,
};
use custody_engine::{Consumer, ConsumerConfig, Relay, RelayConfig};
use custody_sqlite::{SqliteEmbeddedSubscriber, SqliteInbox, SqliteOutbox};
use sqlx::SqlitePool;
use uuid::Uuid;

/// Acks every message with an increasing sequence, except ids in `refuse`
/// (retryable failure, or terminal when `terminal`); records generations.
#[derive(Default)]
struct TestPublisher {
    seq: AtomicU32,
    refuse: Mutex<HashSet<Uuid>>,
    terminal: AtomicBool,
    generations: Mutex<Vec<(Uuid, u32)>>,
}

impl TestPublisher {
    fn send(&self, m: &Message, generation: u32) -> custody_core::Result<PublishAck> {
        if self
            .refuse
            .lock()
            .map(|r| r.contains(&m.id))
            .unwrap_or(false)
        {
            let terminal = self.terminal.load(Ordering::SeqCst);
            return Err(Error::transport(
                "test",
                "publish",
                !terminal,
                "refused by the test",
            ));
        }
        if let Ok(mut g) = self.generations.lock() {
            g.push((m.id, generation));
        }
        Ok(PublishAck {
            stream: Some("TEST".into()),
            sequence: Some(u64::from(self.seq.fetch_add(1, Ordering::SeqCst) + 1)),
            duplicate: false,
        })
    }
}

#[derive(Clone, Default)]
struct SharedPublisher(Arc<TestPublisher>);

impl std::ops::Deref for SharedPublisher {
    type Target = TestPublisher;
    fn deref(&self) -> &TestPublisher {
        &self.0
    }
}

impl Publisher for SharedPublisher {
    async fn publish(&self, m: &Message) -> custody_core::Result<PublishAck> {
        self.0.send(m, 0)
    }
    async fn publish_again(
        &self,
        m: &Message,
        generation: u32,
    ) -> custody_core::Result<PublishAck> {
        self.0.send(m, generation)
    }
}

/// Writes an effect row; fails permanently while `broken`.
#[derive(Clone, Default)]
struct Fixable {
    broken: Arc<AtomicBool>,
}

impl Handler<sqlx::Transaction<'static, sqlx::Sqlite>> for Fixable {
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        msg: &Message,
    ) -> Result<(), HandlerError> {
        if msg.message_type != "Step" {
            return Err(HandlerError::UnknownType(msg.message_type.clone()));
        }
        if self.broken.load(Ordering::SeqCst) {
            return Err(HandlerError::permanent("ledger rejects it (test)"));
        }
        sqlx::query("INSERT INTO effects (message_id, k, seq) VALUES (?, ?, 0)")
            .bind(msg.id.to_string())
            .bind(&msg.key)
            .execute(&mut **tx)
            .await
            .map_err(HandlerError::transient)?;
        Ok(())
    }
}

impl Handler<sqlx::Transaction<'static, sqlx::Postgres>> for Fixable {
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        msg: &Message,
    ) -> Result<(), HandlerError> {
        if msg.message_type != "Step" {
            return Err(HandlerError::UnknownType(msg.message_type.clone()));
        }
        if self.broken.load(Ordering::SeqCst) {
            return Err(HandlerError::permanent("ledger rejects it (test)"));
        }
        sqlx::query("INSERT INTO effects (message_id, k, seq) VALUES ($1, $2, 0)")
            .bind(msg.id)
            .bind(&msg.key)
            .execute(&mut **tx)
            .await
            .map_err(HandlerError::transient)?;
        Ok(())
    }
}

async fn sqlite(dir: &tempfile::TempDir, name: &str) -> anyhow::Result<SqlitePool> {
    let pool = custody_sqlite::connect(dir.path().join(name).to_str().unwrap_or_default()).await?;
    custody_sqlite::migrate(&pool).await?;
    Ok(pool)
}

fn config() -> ConsumerConfig {
    let mut cfg = ConsumerConfig::new("billing");
    cfg.fetch_wait = Duration::from_millis(20);
    cfg.redrive_interval = Duration::ZERO;
    cfg
}

async fn status(a: &SqlitePool, b: &SqlitePool, id: Uuid) -> anyhow::Result<MessageStatus> {
    let mut st = custody_sqlite::status(a, id).await?;
    st.merge(custody_sqlite::status(b, id).await?);
    Ok(st)
}

#[tokio::test]
async fn trace_shows_each_stage() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = sqlite(&dir, "a.db").await?;
    let b = sqlite(&dir, "b.db").await?;
    sqlx::query(EFFECTS_SQLITE).execute(&b).await?;
    let outbox = SqliteOutbox::new(a.clone());
    let ok = step_message("steps", "k1", 1);
    let stuck = step_message("steps", "k2", 1);
    let unknown = Message::builder("steps", "k3", "Nobody")
        .payload(custody_core::CONTENT_TYPE_JSON, b"{}".to_vec())
        .build()?;
    let mut tx = a.begin().await?;
    outbox
        .enqueue_batch(&mut tx, &[ok.clone(), stuck.clone(), unknown.clone()])
        .await?;
    tx.commit().await?;

    assert_eq!(status(&a, &b, ok.id).await?.stage(), Stage::Pending);
    assert_eq!(
        status(&a, &b, Uuid::now_v7()).await?.stage(),
        Stage::Unknown
    );

    let publisher = SharedPublisher::default();
    publisher
        .refuse
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .insert(stuck.id);
    let mut relay = Relay::new(outbox.clone(), publisher.clone(), RelayConfig::default());
    relay.step().await?;

    let st = status(&a, &b, ok.id).await?;
    assert_eq!(st.stage(), Stage::Published, "{st:#?}");
    let p = st
        .producer
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no producer side"))?;
    assert!(
        p.publish_ref
            .as_deref()
            .is_some_and(|r| r.starts_with("TEST:")),
        "{p:#?}"
    );
    assert!(p.published_at.is_some());

    let st = status(&a, &b, stuck.id).await?;
    assert_eq!(st.stage(), Stage::Pending);
    let p = st
        .producer
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no producer side"))?;
    assert_eq!(p.attempts, 1);
    assert!(p.retry_at.is_some(), "next attempt is shown");
    assert!(p
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("refused")));

    // the consumer (embedded transport) processes `ok`, dead-letters `unknown`
    let sub = SqliteEmbeddedSubscriber::new(a.clone(), "billing", &["steps".to_owned()]).await?;
    let mut c = Consumer::new(
        SqliteInbox::new(b.clone()),
        sub,
        Fixable::default(),
        config(),
    );
    while c.run_once().await? > 0 {}
    let st = status(&a, &b, ok.id).await?;
    assert_eq!(st.stage(), Stage::Processed, "{st:#?}");
    assert_eq!(st.consumers.len(), 1);
    assert_eq!(st.consumers[0].consumer, "billing");
    assert!(!st.consumers[0].dead);

    let st = status(&a, &b, unknown.id).await?;
    assert_eq!(st.stage(), Stage::Dead, "{st:#?}");
    assert!(st.dead[0].error.contains("unknown message type"), "{st:#?}");
    assert_eq!(st.dead[0].origin, "consumer:billing");
    Ok(())
}

#[tokio::test]
async fn redriven_consumer_dead_letter_is_processed_exactly_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = sqlite(&dir, "a.db").await?;
    let b = sqlite(&dir, "b.db").await?;
    sqlx::query(EFFECTS_SQLITE).execute(&b).await?;
    let outbox = SqliteOutbox::new(a.clone());
    let msgs: Vec<Message> = (1..=5).map(|i| step_message("steps", "k", i)).collect();
    let poison = msgs[2].id;
    let mut tx = a.begin().await?;
    outbox.enqueue_batch(&mut tx, &msgs).await?;
    tx.commit().await?;

    let handler = Fixable::default();
    // the third message fails for real: the ledger is broken while it arrives
    let sub = SqliteEmbeddedSubscriber::new(a.clone(), "billing", &["steps".to_owned()]).await?;
    let mut c = Consumer::new(SqliteInbox::new(b.clone()), sub, handler.clone(), config());
    let mut cfg1 = config();
    cfg1.batch_size = 2;
    let sub = SqliteEmbeddedSubscriber::new(a.clone(), "billing", &["steps".to_owned()]).await?;
    let mut first = Consumer::new(SqliteInbox::new(b.clone()), sub, handler.clone(), cfg1);
    first.run_once().await?; // 1, 2
    handler.broken.store(true, Ordering::SeqCst);
    first.run_once().await?; // 3 dead, 4 dead
    handler.broken.store(false, Ordering::SeqCst);
    drop(first);
    while c.run_once().await? > 0 {}
    let dead = custody_sqlite::dead_letter_rows(&b).await?;
    assert_eq!(dead.len(), 2, "{dead:#?}");
    assert_eq!(dead[0].1.message_id, Some(poison));

    // a redelivery alone does not help: the inbox skips it
    custody_sqlite::set_checkpoint(&a, "billing", 0).await?;
    let sub = SqliteEmbeddedSubscriber::new(a.clone(), "billing", &["steps".to_owned()]).await?;
    let mut again = Consumer::new(SqliteInbox::new(b.clone()), sub, handler.clone(), config());
    while again.run_once().await? > 0 {}
    assert_eq!(again.stats().processed, 0);
    assert_eq!(again.stats().duplicates, 5);

    // redrive one by id
    let seqs: Vec<i64> = dead
        .iter()
        .filter(|(_, d)| d.message_id == Some(poison))
        .map(|(s, _)| *s)
        .collect();
    let out = custody_sqlite::redrive(&b, &seqs, Utc::now()).await?;
    assert_eq!(
        (out.to_consumer, out.to_relay, out.skipped.len()),
        (1, 0, 0)
    );
    let st = status(&a, &b, poison).await?;
    assert_eq!(st.stage(), Stage::Redriving, "{st:#?}");
    assert!(st.consumers.is_empty(), "redrive deletes the inbox row");

    while again.run_once().await? > 0 {}
    assert_eq!(again.stats().redriven, 1);
    assert_eq!(again.stats().processed, 1);
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM effects WHERE message_id = ?")
        .bind(poison.to_string())
        .fetch_one(&b)
        .await?;
    assert_eq!(n, 1);
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM custody_redrive")
        .fetch_one(&b)
        .await?;
    assert_eq!(left, 0);
    assert_eq!(status(&a, &b, poison).await?.stage(), Stage::Processed);

    // redriving it again finds nothing; redelivering it is a duplicate
    let out = custody_sqlite::redrive(&b, &seqs, Utc::now()).await?;
    assert_eq!(out.skipped.len(), 1);
    custody_sqlite::set_checkpoint(&a, "billing", 0).await?;
    let sub = SqliteEmbeddedSubscriber::new(a.clone(), "billing", &["steps".to_owned()]).await?;
    let mut third = Consumer::new(SqliteInbox::new(b.clone()), sub, handler.clone(), config());
    while third.run_once().await? > 0 {}
    assert_eq!(third.stats().processed, 0);
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM effects WHERE message_id = ?")
        .bind(poison.to_string())
        .fetch_one(&b)
        .await?;
    assert_eq!(n, 1, "processed once in total");

    // purge the other one; its inbox row stays
    let rest = custody_sqlite::dead_letter_rows(&b).await?;
    assert_eq!(rest.len(), 1);
    let purged = custody_sqlite::purge(&b, &[rest[0].0]).await?;
    assert_eq!(purged, 1);
    assert!(custody_sqlite::dead_letter_rows(&b).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn redriven_relay_dead_letter_is_published_again() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = sqlite(&dir, "a.db").await?;
    let outbox = SqliteOutbox::new(a.clone());
    let m = step_message("steps", "k", 1);
    let mut tx = a.begin().await?;
    outbox.enqueue(&mut tx, &m).await?;
    tx.commit().await?;
    let publisher = SharedPublisher::default();
    publisher.terminal.store(true, Ordering::SeqCst);
    publisher
        .refuse
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .insert(m.id);
    let mut relay = Relay::new(outbox.clone(), publisher.clone(), RelayConfig::default());
    relay.step().await?;
    let st = custody_sqlite::status(&a, m.id).await?;
    assert_eq!(st.stage(), Stage::Dead, "{st:#?}");
    assert_eq!(st.dead[0].origin, "relay");

    let dead = custody_sqlite::dead_letter_rows(&a).await?;
    let out = custody_sqlite::redrive(&a, &[dead[0].0], Utc::now()).await?;
    assert_eq!(out.to_relay, 1);
    publisher
        .refuse
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .clear();
    relay.step().await?;
    let st = custody_sqlite::status(&a, m.id).await?;
    assert_eq!(st.stage(), Stage::Published, "{st:#?}");
    let gens = publisher
        .generations
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .clone();
    let of_m: Vec<_> = gens.iter().filter(|(id, _)| *id == m.id).copied().collect();
    assert_eq!(
        of_m,
        vec![(m.id, 1)],
        "published as a republish (new transport dedupe id)"
    );
    // and, before it, the skip marker that kept its first number accounted for
    assert_eq!(gens.len(), 2, "{gens:?}");
    Ok(())
}

#[tokio::test]
async fn inbox_pruning_keeps_recent_rows_and_dead_letters() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let b = sqlite(&dir, "b.db").await?;
    let inbox = SqliteInbox::new(b.clone());
    let old = Utc::now() - chrono::Duration::days(10);
    let mut ids = Vec::new();
    for i in 0..25 {
        let m = step_message("steps", "k", i);
        let mut tx = inbox.begin().await?;
        let at = if i < 20 { old } else { Utc::now() };
        inbox.record(&mut tx, "billing", &m, at).await?;
        inbox.commit(tx).await?;
        ids.push(m);
    }
    // one old message was dead-lettered: its inbox row must stay
    let dead = custody_core::DeadLetter {
        message_id: Some(ids[0].id),
        origin: "consumer:billing".into(),
        topic: "steps".into(),
        key: None,
        message_type: None,
        payload: vec![],
        envelope: None,
        error: "test".into(),
        attempts: 1,
        dead_at: old,
    };
    inbox.dead_letter("billing", &dead).await?;
    let cutoff = Utc::now() - chrono::Duration::days(7);
    assert_eq!(
        inbox.prune("billing", cutoff, 8).await?,
        8,
        "bounded by the limit"
    );
    assert_eq!(inbox.prune("billing", cutoff, 100).await?, 11);
    assert_eq!(inbox.prune("billing", cutoff, 100).await?, 0);
    let left: Vec<String> =
        sqlx::query_scalar("SELECT message_id FROM custody_inbox ORDER BY processed_at")
            .fetch_all(&b)
            .await?;
    assert_eq!(left.len(), 6);
    assert_eq!(left[0], ids[0].id.to_string());

    // the consumer engine prunes on its interval with its retention
    let a = sqlite(&dir, "a.db").await?;
    let sub = SqliteEmbeddedSubscriber::new(a.clone(), "billing", &[]).await?;
    let mut cfg = config();
    cfg.inbox_retention = Duration::from_secs(3600);
    let mut c = Consumer::new(inbox.clone(), sub, Fixable::default(), cfg);
    sqlx::query("UPDATE custody_inbox SET processed_at = ?")
        .bind((Utc::now() - chrono::Duration::hours(2)).timestamp_millis())
        .execute(&b)
        .await?;
    c.run_once().await?;
    assert_eq!(c.stats().pruned, 5, "all but the dead-lettered one");
    Ok(())
}

#[tokio::test]
async fn postgres_redrive_status_and_prune() -> anyhow::Result<()> {
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let pool = custody_postgres::connect(&db.url).await?;
    custody_postgres::migrate(&pool).await?;
    sqlx::query(EFFECTS_PG).execute(&pool).await?;
    let outbox = custody_postgres::PgOutbox::new(pool.clone());
    let msgs: Vec<Message> = (1..=3).map(|i| step_message("steps", "k", i)).collect();
    let mut tx = pool.begin().await?;
    outbox.enqueue_batch(&mut tx, &msgs).await?;
    tx.commit().await?;
    let st = custody_postgres::status(&pool, msgs[0].id).await?;
    assert_eq!(st.stage(), Stage::Pending);

    let handler = Fixable::default();
    handler.broken.store(true, Ordering::SeqCst);
    let inbox = custody_postgres::PgInbox::new(pool.clone());
    let sub = custody_postgres::PgEmbeddedSubscriber::new(pool.clone(), "billing", &[]).await?;
    let mut c = Consumer::new(inbox.clone(), sub, handler.clone(), config());
    // PostgreSQL's embedded reader waits for the cluster-wide snapshot xmin
    // (other databases' transactions can hold it back for a moment)
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while c.stats().dead_lettered < 3 && std::time::Instant::now() < deadline {
        c.run_once().await?;
    }
    assert_eq!(c.stats().dead_lettered, 3);
    let st = custody_postgres::status(&pool, msgs[1].id).await?;
    assert_eq!(st.stage(), Stage::Dead);
    assert!(st.consumers[0].dead);

    handler.broken.store(false, Ordering::SeqCst);
    let dead = custody_postgres::dead_letter_rows(&pool).await?;
    let seqs: Vec<i64> = dead.iter().map(|(s, _)| *s).collect();
    let out = custody_postgres::redrive(&pool, &seqs, Utc::now()).await?;
    assert_eq!(out.to_consumer, 3);
    assert_eq!(
        custody_postgres::status(&pool, msgs[1].id).await?.stage(),
        Stage::Redriving
    );
    while c.run_once().await? > 0 {}
    assert_eq!(c.stats().redriven, 3);
    let (n, distinct): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT message_id) FROM effects")
            .fetch_one(&pool)
            .await?;
    assert_eq!((n, distinct), (3, 3));
    assert_eq!(
        custody_postgres::status(&pool, msgs[1].id).await?.stage(),
        Stage::Processed
    );
    assert!(custody_postgres::dead_letter_rows(&pool).await?.is_empty());

    // embedded repair on PostgreSQL: lose one delivery, rewind, process it again (once)
    sqlx::query("DELETE FROM custody_inbox WHERE message_id = $1")
        .bind(msgs[1].id)
        .execute(&pool)
        .await?;
    sqlx::query("DELETE FROM effects WHERE message_id = $1")
        .bind(msgs[1].id)
        .execute(&pool)
        .await?;
    drop(c);
    let at = custody_postgres::rewind_checkpoint(&pool, "billing", &[msgs[1].id]).await?;
    assert!(at.is_some());
    assert_eq!(
        custody_postgres::rewind_checkpoint(&pool, "billing", &[msgs[1].id]).await?,
        None,
        "already before it: never moved forward or again"
    );
    let sub = custody_postgres::PgEmbeddedSubscriber::new(pool.clone(), "billing", &[]).await?;
    let mut c = Consumer::new(inbox.clone(), sub, handler.clone(), config());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while c.stats().processed + c.stats().duplicates < 2 && std::time::Instant::now() < deadline {
        c.run_once().await?;
    }
    assert_eq!((c.stats().processed, c.stats().duplicates), (1, 1));
    let (n, distinct): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT message_id) FROM effects")
            .fetch_one(&pool)
            .await?;
    assert_eq!((n, distinct), (3, 3));

    let pruned = inbox
        .prune("billing", Utc::now() + chrono::Duration::hours(1), 2)
        .await?;
    assert_eq!(pruned, 2);
    let pruned = inbox
        .prune("billing", Utc::now() + chrono::Duration::hours(1), 100)
        .await?;
    assert_eq!(pruned, 1);
    Ok(())
}
