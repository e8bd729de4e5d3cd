//! Issue 11, scenario 1 and the "also seen" of 8: no input on the wire may
//! stop a PostgreSQL consumer. Bytes are published straight onto the
//! consumed subject with async-nats (not through custody's publisher, which
//! validates), the real consumer runs against the real PostgreSQL, and
//! every bad message must end in the dead-letter table while the messages
//! after it are applied.

mod common;

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use common::{env, step_message, Env, Recorder};
use custody_core::{Publisher, Stage};
use custody_engine::{Consumer, ConsumerConfig};
use custody_nats::{encode_headers, NatsPublisher, NatsSubscriber};
use custody_postgres::PgInbox;
use sqlx::Row;

type PgConsumer = Consumer<PgInbox, NatsSubscriber, Recorder>;

async fn consumer(e: &Env) -> anyhow::Result<PgConsumer> {
    let sub = e.billing_subscriber().await?;
    let mut cfg = ConsumerConfig::new("billing");
    cfg.fetch_wait = Duration::from_millis(200);
    Ok(Consumer::new(
        PgInbox::new(e.b.clone()),
        sub,
        Recorder::default(),
        cfg,
    ))
}

/// Publish `msg`'s headers with `edit` applied, straight onto the subject.
async fn publish_raw(
    e: &Env,
    msg: &custody_core::Message,
    edit: impl FnOnce(&mut HeaderMap),
) -> anyhow::Result<()> {
    // as another producer would write them: custody's headers without
    // custody's Nats-Msg-Id (so JetStream does not drop a copy as a duplicate)
    let mut h = HeaderMap::new();
    for (name, values) in encode_headers(msg).iter() {
        if name.to_string().eq_ignore_ascii_case("nats-msg-id") {
            continue;
        }
        for v in values {
            h.append(name.clone(), v.clone());
        }
    }
    edit(&mut h);
    let js = async_nats::jetstream::new(e.client.clone());
    js.publish_with_headers(e.spec.subject(&msg.topic), h, msg.payload.clone().into())
        .await?
        .await?;
    Ok(())
}

async fn effects(e: &Env) -> anyhow::Result<Vec<String>> {
    let rows = sqlx::query("SELECT message_id::text FROM effects ORDER BY n")
        .fetch_all(&e.b)
        .await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

/// (message id, error) of every dead letter in B.
async fn dead(e: &Env) -> anyhow::Result<Vec<(Option<String>, String)>> {
    let rows = sqlx::query("SELECT message_id::text, error FROM custody_dead_letter ORDER BY seq")
        .fetch_all(&e.b)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// Run the consumer until `effects` effects and `dead` dead letters exist
/// (or 20 s pass); a consumer that stops fails the test with its error.
async fn consume_until(
    e: &Env,
    c: &mut PgConsumer,
    n_effects: usize,
    n_dead: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while (effects(e).await?.len() < n_effects || dead(e).await?.len() < n_dead)
        && Instant::now() < deadline
    {
        c.run_once().await?;
    }
    Ok(())
}

#[tokio::test]
async fn nul_bytes_in_headers_topic_or_key_are_dead_lettered_and_the_consumer_goes_on(
) -> anyhow::Result<()> {
    let Some(e) = env(None, "custody_nul").await? else {
        return Ok(());
    };
    let bad_producer = step_message("steps", "k1", 1);
    let bad_key = step_message("steps", "k2", 1);
    let bad_topic = step_message("steps", "k3", 1);
    let bad_type = step_message("steps", "k4", 1);
    let good = step_message("steps", "k5", 1);
    publish_raw(&e, &bad_producer, |h| {
        h.insert("ce-custodyproducer", "p%00x");
        h.insert("ce-custodypartition", "0");
        h.insert("ce-custodyseq", "1");
    })
    .await?;
    publish_raw(&e, &bad_key, |h| {
        h.insert("ce-partitionkey", "k%002");
        h.insert("ce-subject", "k%002");
    })
    .await?;
    publish_raw(&e, &bad_topic, |h| h.insert("ce-custodytopic", "st%00eps")).await?;
    publish_raw(&e, &bad_type, |h| h.insert("ce-type", "St%01ep")).await?;
    publish_raw(&e, &good, |_| {}).await?;

    let mut c = consumer(&e).await?;
    consume_until(&e, &mut c, 1, 4).await?;
    assert_eq!(effects(&e).await?, vec![good.id.to_string()]);
    let dead = dead(&e).await?;
    assert_eq!(dead.len(), 4, "{dead:?}");
    for (m, what) in [
        (&bad_producer, "header \"custodyproducer\" holds a NUL"),
        (&bad_key, "key holds a NUL"),
        (&bad_topic, "topic holds the control character '\\0'"),
        (&bad_type, "type holds the control character '\\u{1}'"),
    ] {
        let found = dead
            .iter()
            .find(|(id, _)| id.as_deref() == Some(m.id.to_string().as_str()));
        let Some((_, error)) = found else {
            panic!("{} ({what}) not dead-lettered under its id: {dead:?}", m.id);
        };
        assert!(error.contains("malformed message"), "{error}");
        assert!(error.contains(what), "{error} should say {what}");
        assert!(!error.contains('\0'), "{error:?} holds a NUL");
    }
    // nothing left to redeliver: every message was acknowledged
    let stats = c.stats().clone();
    assert_eq!((stats.processed, stats.dead_lettered), (1, 4));
    drop(e); // deletes the stream and both databases
    Ok(())
}

/// A message the database refuses at commit (a deferred constraint of the
/// handler's own table, SQLSTATE 23505) is about the message: it is
/// dead-lettered and the consumer applies the next one, instead of
/// returning the error and stopping for good.
#[tokio::test]
async fn a_message_the_database_refuses_is_dead_lettered_not_fatal() -> anyhow::Result<()> {
    let Some(e) = env(None, "custody_refused").await? else {
        return Ok(());
    };
    // one effect per (k, seq): the second message with the same step is
    // refused when the group commits
    sqlx::query(
        "ALTER TABLE effects ADD CONSTRAINT one_step UNIQUE (k, seq) DEFERRABLE INITIALLY DEFERRED",
    )
    .execute(&e.b)
    .await?;
    let first = step_message("steps", "k", 1);
    let again = step_message("steps", "k", 1);
    let next = step_message("steps", "k", 2);
    let publisher = NatsPublisher::new(e.client.clone(), &e.spec);
    for m in [&first, &again, &next] {
        publisher.publish(m).await?;
    }
    let mut c = consumer(&e).await?;
    consume_until(&e, &mut c, 2, 1).await?;
    assert_eq!(
        effects(&e).await?,
        vec![first.id.to_string(), next.id.to_string()]
    );
    let dead = dead(&e).await?;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0.as_deref(), Some(again.id.to_string().as_str()));
    assert!(dead[0].1.contains("refused this message"), "{}", dead[0].1);
    drop(e); // deletes the stream and both databases
    Ok(())
}

/// A forged copy of a processed message (same id, unreadable `ce-time`) is
/// dead-lettered without the id: `trace` still says processed, because the
/// effect is in B.
#[tokio::test]
async fn a_malformed_copy_of_a_processed_id_does_not_make_it_dead() -> anyhow::Result<()> {
    let Some(e) = env(None, "custody_forged").await? else {
        return Ok(());
    };
    let m = step_message("steps", "k", 1);
    NatsPublisher::new(e.client.clone(), &e.spec)
        .publish(&m)
        .await?;
    let mut c = consumer(&e).await?;
    consume_until(&e, &mut c, 1, 0).await?;
    assert_eq!(effects(&e).await?, vec![m.id.to_string()]);

    publish_raw(&e, &m, |h| {
        h.insert("ce-time", "yesterday");
    })
    .await?;
    let js = async_nats::jetstream::new(e.client.clone());
    let mut stream = js.get_stream(&e.spec.name).await?;
    assert_eq!(
        stream.info().await?.state.messages,
        2,
        "the copy is on the stream"
    );
    consume_until(&e, &mut c, 1, 1).await?;
    let dead = dead(&e).await?;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, None, "the copy is stored without the id");
    assert!(dead[0].1.contains(&m.id.to_string()), "{}", dead[0].1);
    let status = custody_postgres::status(&e.b, m.id).await?;
    assert_eq!(status.stage(), Stage::Processed, "{status:?}");
    drop(e); // deletes the stream and both databases
    Ok(())
}
