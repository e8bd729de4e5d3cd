//! Issue 11, scenario 10 over the in-memory backends: a hung handler is a
//! transient failure (`consumer.handler-timeout`), and the attempt counting
//! that dead-letters poison attributes a crash to the message that caused
//! it, not to its group. (The crash itself, of a real process, is in
//! tests/poison.rs.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use custody_core::{Handler, HandlerError, InboxStore, Message, Publisher};
use custody_engine::{Consumer, ConsumerConfig};
use custody_testkit::memory::{MemoryBroker, MemoryInbox, MemoryTx};
use uuid::Uuid;

fn msg(key: &str, ty: &str) -> Message {
    Message::builder("steps", key, ty)
        .json(&serde_json::json!({}))
        .and_then(|b| b.build())
        .expect("valid message")
}

/// Hangs on the first `Hang` message it sees, applies everything else.
#[derive(Clone, Default)]
struct HangOnce {
    hung: Arc<AtomicBool>,
}

impl Handler<MemoryTx> for HangOnce {
    async fn handle(&self, tx: &mut MemoryTx, m: &Message) -> Result<(), HandlerError> {
        if m.message_type == "Hang" && !self.hung.swap(true, Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        tx.apply(m);
        Ok(())
    }
}

fn config() -> ConsumerConfig {
    let mut cfg = ConsumerConfig::new("billing");
    cfg.fetch_wait = Duration::from_millis(10);
    cfg.backoff.base = Duration::from_millis(1);
    cfg.backoff.max = Duration::from_millis(5);
    cfg
}

#[tokio::test]
async fn a_hung_handler_times_out_as_a_transient_failure_and_is_retried() -> anyhow::Result<()> {
    let broker = MemoryBroker::default();
    let hang = msg("k", "Hang");
    let next = msg("k", "Step");
    broker.publish(&hang).await?;
    broker.publish(&next).await?;
    let inbox = MemoryInbox::default();
    let mut cfg = config();
    cfg.handler_timeout = Duration::from_millis(200);
    cfg.group_commit = false; // so the retry is the single path's, counted in stats
    let mut c = Consumer::new(
        inbox.clone(),
        broker.subscribe("billing"),
        HangOnce::default(),
        cfg,
    );
    for _ in 0..10 {
        if inbox.effects().len() == 2 {
            break;
        }
        c.run_once().await?;
    }
    let applied: Vec<Uuid> = inbox.effects().iter().map(|e| e.message_id).collect();
    assert_eq!(
        applied,
        vec![hang.id, next.id],
        "retried after the timeout, in order"
    );
    assert_eq!(c.stats().retries, 1);
    assert!(inbox.dead_letters().is_empty());
    Ok(())
}

/// The attempt counting every backend implements (`InboxStore::start_attempts`).
async fn attempts_count_crashes_of_a_message_started_alone_only<I: InboxStore>(
    inbox: &I,
) -> anyhow::Result<()> {
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let (run1, run2, run3) = (
        Uuid::from_u128(11),
        Uuid::from_u128(12),
        Uuid::from_u128(13),
    );
    let now = chrono::Utc::now();
    // run 1 starts a and b in a group (b twice: a batch may hold a
    // redelivery) and dies
    let first = inbox
        .start_attempts("c", run1, &[a, b, b], false, now)
        .await?;
    assert_eq!(first.len(), 3);
    assert!(
        first.iter().all(|x| !x.unfinished && x.crashes == 0),
        "{first:?}"
    );
    // run 2 finds both unfinished, no crash attributed yet; starts a alone and dies
    let second = inbox.start_attempts("c", run2, &[a, b], false, now).await?;
    assert!(
        second.iter().all(|x| x.unfinished && x.crashes == 0),
        "{second:?}"
    );
    let again = inbox.start_attempts("c", run2, &[a], true, now).await?;
    assert_eq!(
        (again[0].unfinished, again[0].crashes),
        (true, 0),
        "same run counts nothing, and the message stays unfinished for the run"
    );
    // run 3: a crashed a run alone, b did not
    let third = inbox.start_attempts("c", run3, &[a, b], false, now).await?;
    assert_eq!((third[0].unfinished, third[0].crashes), (true, 1));
    assert_eq!((third[1].unfinished, third[1].crashes), (true, 0));
    // another consumer's attempts are its own
    let other = inbox.start_attempts("d", run3, &[a], true, now).await?;
    assert_eq!((other[0].unfinished, other[0].crashes), (false, 0));
    // finishing in a committed transaction clears the count
    let mut tx = inbox.begin().await?;
    inbox.finish_attempts(&mut tx, "c", &[a]).await?;
    inbox.commit(tx).await?;
    let fresh = inbox.start_attempts("c", run3, &[a], true, now).await?;
    assert_eq!((fresh[0].unfinished, fresh[0].crashes), (false, 0));
    // a rolled-back finish leaves it
    let mut tx = inbox.begin().await?;
    inbox.finish_attempts(&mut tx, "c", &[b]).await?;
    drop(tx);
    let kept = inbox.start_attempts("c", run1, &[b], false, now).await?;
    assert!(kept[0].unfinished, "{kept:?}");
    Ok(())
}

#[tokio::test]
async fn attempts_memory() -> anyhow::Result<()> {
    attempts_count_crashes_of_a_message_started_alone_only(&MemoryInbox::default()).await
}

#[tokio::test]
async fn attempts_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("b.db");
    let pool = custody_sqlite::connect(&path.to_string_lossy()).await?;
    custody_sqlite::migrate(&pool).await?;
    attempts_count_crashes_of_a_message_started_alone_only(&custody_sqlite::SqliteInbox::new(pool))
        .await
}

#[tokio::test]
async fn attempts_postgres() -> anyhow::Result<()> {
    let Some(db) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    let pool = custody_postgres::connect(&db.url).await?;
    custody_postgres::migrate(&pool).await?;
    attempts_count_crashes_of_a_message_started_alone_only(&custody_postgres::PgInbox::new(pool))
        .await
}

/// Writes a `child` row per message; an `Orphan` message's row points at a
/// parent that does not exist, which SQLite refuses only at commit (a
/// deferred foreign key): an error the store raises about the message.
#[derive(Clone, Default)]
struct Children;

impl Handler<sqlx::Transaction<'static, sqlx::Sqlite>> for Children {
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        m: &Message,
    ) -> Result<(), HandlerError> {
        let parent = if m.message_type == "Orphan" { 999 } else { 1 };
        sqlx::query("INSERT INTO child (message_id, parent) VALUES (?, ?)")
            .bind(m.id.to_string())
            .bind(parent)
            .execute(&mut **tx)
            .await
            .map_err(HandlerError::transient)?;
        Ok(())
    }
}

/// The SQLite side of "an error about the message is the message's": the
/// commit fails with SQLITE_CONSTRAINT, the consumer dead-letters that
/// message and applies the next (before: `run_once` returned the error, and
/// `run` stopped the consumer for good).
#[tokio::test]
async fn sqlite_a_message_the_database_refuses_at_commit_is_dead_lettered() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("b.db");
    let pool = custody_sqlite::connect(&path.to_string_lossy()).await?;
    custody_sqlite::migrate(&pool).await?;
    sqlx::query("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO parent (id) VALUES (1)")
        .execute(&pool)
        .await?;
    sqlx::query(
        "CREATE TABLE child (message_id TEXT NOT NULL, parent INTEGER NOT NULL \
         REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)",
    )
    .execute(&pool)
    .await?;
    let broker = MemoryBroker::default();
    let (first, orphan, next) = (msg("k", "Step"), msg("k", "Orphan"), msg("k", "Step"));
    for m in [&first, &orphan, &next] {
        broker.publish(m).await?;
    }
    let inbox = custody_sqlite::SqliteInbox::new(pool.clone());
    let mut c = Consumer::new(inbox, broker.subscribe("billing"), Children, config());
    for _ in 0..10 {
        if c.stats().processed + c.stats().dead_lettered == 3 {
            break;
        }
        c.run_once().await?;
    }
    let applied: Vec<String> = sqlx::query_scalar("SELECT message_id FROM child ORDER BY rowid")
        .fetch_all(&pool)
        .await?;
    assert_eq!(applied, vec![first.id.to_string(), next.id.to_string()]);
    let dead = custody_sqlite::dead_letters(&pool).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, Some(orphan.id));
    assert!(
        dead[0].error.contains("refused this message"),
        "{}",
        dead[0].error
    );
    Ok(())
}
