//! Issue 11, scenario 4: a producer's identity changes when its history
//! could have forked. Here for real: `CREATE DATABASE clone TEMPLATE orders`
//! copies custody_producer and custody_sequence; both databases then
//! produce and one consumer takes everything into one inbox. Before the
//! identity was bound to the database, the clone numbered its messages under
//! the template's id with numbers the consumer's floor already covered: they
//! were reported as duplicates and their handlers never ran.
#![allow(missing_docs)]

mod common;

use std::time::Duration;

use chrono::Utc;
use custody_core::{InboxOutcome, InboxStore, Message, OutboxStore, PublishAck, Sequence};
use custody_postgres::{PgInbox, PgOutbox};
use sqlx::{Connection, PgPool};

use common::{db, msg, settle};

const TTL: Duration = Duration::from_secs(30);

/// Enqueue `n` messages, then do what the relay does: lease, number, stamp
/// with the producer id, mark published. Returns the stamped messages.
async fn produce(pool: &PgPool, relay: &str, n: u64) -> anyhow::Result<Vec<Message>> {
    let outbox = PgOutbox::new(pool.clone());
    let mut tx = pool.begin().await?;
    for i in 0..n {
        outbox.enqueue(&mut tx, &msg("orders", "k", i)).await?;
    }
    tx.commit().await?;
    settle(pool).await?;
    // the relay reads the producer id before it numbers anything
    let producer = outbox
        .producer_id()
        .await?
        .ok_or_else(|| anyhow::anyhow!("PostgreSQL outboxes number messages"))?;
    let now = Utc::now();
    let all = outbox.acquire_leases(relay, TTL, now).await?;
    let mut batch = outbox.fetch_batch(&all, 100, now).await?;
    outbox.assign_sequences(relay, &mut batch, now).await?;
    let acked: Vec<(i64, PublishAck)> = batch
        .iter()
        .map(|r| (r.position, PublishAck::default()))
        .collect();
    outbox.mark_published(relay, &acked, now).await?;
    outbox.release_leases(relay).await?;
    let mut out = Vec::new();
    for mut r in batch {
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
        out.push(r.message);
    }
    Ok(out)
}

/// Consume `msgs` in order into `inbox`; the outcomes.
async fn consume(inbox: &PgInbox, msgs: &[Message]) -> anyhow::Result<Vec<InboxOutcome>> {
    let mut out = Vec::new();
    for m in msgs {
        let mut tx = inbox.begin().await?;
        out.push(inbox.record(&mut tx, "billing", m, Utc::now()).await?);
        inbox.commit(tx).await?;
    }
    Ok(out)
}

fn seqs(msgs: &[Message]) -> Vec<u64> {
    msgs.iter()
        .filter_map(|m| Sequence::of(m).map(|s| s.seq))
        .collect()
}

/// Drops the clone database at the end, whatever happens.
struct DropDb(String);

impl Drop for DropDb {
    fn drop(&mut self) {
        let name = self.0.clone();
        custody_testkit::block_on_own_runtime(async move {
            if let Ok(mut c) =
                sqlx::PgConnection::connect(&custody_testkit::postgres_server_url()).await
            {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut c)
                    .await;
            }
        });
    }
}

#[tokio::test]
async fn a_template_clone_is_a_new_producer_and_nothing_is_dropped() -> anyhow::Result<()> {
    let Some((orders_db, orders)) = db().await? else {
        return Ok(());
    };
    let Some((_billing_db, billing)) = db().await? else {
        return Ok(());
    };
    let inbox = PgInbox::new(billing.clone());

    // The template produces 1..3; the consumer takes them and compacts
    // (rows kept: the keep window is in the past).
    let before = produce(&orders, "r", 3).await?;
    assert_eq!(seqs(&before), vec![1, 2, 3]);
    assert_eq!(consume(&inbox, &before).await?, vec![InboxOutcome::New; 3]);
    inbox
        .compact("billing", Utc::now() - chrono::Duration::hours(1), 100)
        .await?;

    // CREATE DATABASE … TEMPLATE (no session may be connected to it).
    orders.close().await;
    let clone_name = custody_testkit::unique_name("custody_clone");
    let _cleanup = DropDb(clone_name.clone());
    let mut server = sqlx::PgConnection::connect(&custody_testkit::postgres_server_url()).await?;
    sqlx::query(&format!(
        "CREATE DATABASE {clone_name} TEMPLATE {}",
        orders_db.name
    ))
    .execute(&mut server)
    .await?;
    let _ = server.close().await;
    let orders = custody_postgres::connect(&orders_db.url).await?;
    let clone_url = orders_db.url.replace(&orders_db.name, &clone_name);
    let clone = custody_postgres::connect(&clone_url).await?;
    custody_postgres::migrate(&clone).await?;
    let copied: String = sqlx::query_scalar("SELECT id FROM custody_producer")
        .fetch_one(&clone)
        .await?;
    let original = Sequence::of(&before[0])
        .map(|s| s.producer)
        .unwrap_or_default();
    assert_eq!(
        copied, original,
        "the clone starts with the template's id (copied)"
    );

    // Both produce; one consumer takes the template's first, then the clone's.
    let from_template = produce(&orders, "r", 3).await?;
    let from_clone = produce(&clone, "r", 3).await?;
    let template_id = Sequence::of(&from_template[0]).map(|s| s.producer);
    let clone_id = Sequence::of(&from_clone[0]).map(|s| s.producer);
    assert_eq!(template_id.as_deref(), Some(original.as_str()));
    assert_ne!(
        clone_id, template_id,
        "the clone must be a producer of its own"
    );
    assert_eq!(seqs(&from_template), vec![4, 5, 6]);
    assert_eq!(
        seqs(&from_clone),
        vec![1, 2, 3],
        "the clone's numbering restarts at 1 under its new id"
    );
    assert_eq!(
        consume(&inbox, &from_template).await?,
        vec![InboxOutcome::New; 3]
    );
    inbox
        .compact("billing", Utc::now() - chrono::Duration::hours(1), 100)
        .await?;
    assert_eq!(
        consume(&inbox, &from_clone).await?,
        vec![InboxOutcome::New; 3],
        "the clone's messages were dropped as duplicates"
    );
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM custody_dead_letter")
        .fetch_one(&billing)
        .await?;
    assert_eq!(dead, 0);
    // every partition of both producers is hole-free
    inbox
        .compact("billing", Utc::now() - chrono::Duration::hours(1), 100)
        .await?;
    let progress = inbox.progress("billing").await?;
    assert!(progress.iter().all(|p| p.holes == 0), "{progress:?}");
    let floors: Vec<u64> = progress.iter().map(|p| p.floor).collect();
    assert_eq!(floors.iter().sum::<u64>(), 9, "{progress:?}");

    // the renewal is recorded in the clone, not in the template
    let renewed: Vec<(String, String)> =
        sqlx::query_as("SELECT old_id, new_id FROM custody_producer_history")
            .fetch_all(&clone)
            .await?;
    assert_eq!(
        renewed,
        vec![(original.clone(), clone_id.unwrap_or_default())]
    );
    let template_history: i64 = sqlx::query_scalar("SELECT count(*) FROM custody_producer_history")
        .fetch_one(&orders)
        .await?;
    assert_eq!(template_history, 0);
    clone.close().await;
    orders.close().await;
    Ok(())
}
