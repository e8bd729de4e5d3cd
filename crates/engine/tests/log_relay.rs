//! The event log as outbox: event store → log relay → NATS JetStream →
//! consumer → inbox, with the failures the relay must survive.

mod common;

use std::time::{Duration, Instant};

use common::{verdict, Recorder, Step, EFFECTS_SQLITE};
use custody_core::event::{EventData, EventStore, ExpectedVersion};
use custody_core::log_relay::LogRelayStore;
use custody_core::{OutboxStore, Publisher};
use custody_engine::log_relay::{log_relay, LogOutbox, LogRelayConfig};
use custody_engine::{CancellationToken, Consumer, ConsumerConfig, Relay, RelayConfig};
use custody_nats::{NatsPublisher, NatsSubscriber, StreamSpec};
use custody_sqlite::{SqliteInbox, SqliteLogRelayStore};
use custody_testkit::NatsServer;
use sqlx::{Row, SqlitePool};

use custody_sqlite::SqliteEventStore as SqliteLog;

/// A producer database (event log + log relay state), a consumer database
/// (inbox + effects) and a JetStream stream of the test's own.
struct Env {
    _dir: tempfile::TempDir,
    _a: SqlitePool,
    b: SqlitePool,
    log: SqliteLog,
    state: SqliteLogRelayStore,
    client: async_nats::Client,
    spec: StreamSpec,
    url: String,
}

impl Env {
    async fn new(nats_url: Option<&str>) -> anyhow::Result<Option<Env>> {
        let url = match nats_url {
            Some(u) => u.to_owned(),
            None => match custody_testkit::nats().await? {
                Some(u) => u,
                None => return Ok(None),
            },
        };
        let dir = tempfile::tempdir()?;
        let path = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        let a = custody_sqlite::connect(&path("a.db")).await?;
        let b = custody_sqlite::connect(&path("b.db")).await?;
        custody_sqlite::migrate(&a).await?;
        custody_sqlite::migrate(&b).await?;
        sqlx::query(EFFECTS_SQLITE).execute(&b).await?;
        let client = custody_nats::connect(&url).await?;
        let name = custody_testkit::unique_name("custody_log");
        let spec = StreamSpec::new(&name.to_uppercase(), &name);
        custody_nats::ensure_stream(&client, &spec).await?;
        Ok(Some(Env {
            log: SqliteLog::new(a.clone()),
            state: SqliteLogRelayStore::new(a.clone()),
            _dir: dir,
            _a: a,
            b,
            client,
            spec,
            url,
        }))
    }

    fn db_path(&self) -> String {
        self._dir.path().join("a.db").to_string_lossy().into_owned()
    }

    /// Append `Step { key: stream, seq }` events to `stream`, one append each.
    async fn append(
        &self,
        stream: &str,
        seqs: std::ops::RangeInclusive<i64>,
    ) -> anyhow::Result<()> {
        for seq in seqs {
            let e = EventData::json(
                "Step",
                &Step {
                    key: stream.to_owned(),
                    seq,
                },
            )?;
            self.log
                .append(stream, ExpectedVersion::Any, vec![e])
                .await?;
        }
        Ok(())
    }

    fn publisher(&self) -> NatsPublisher {
        NatsPublisher::new(self.client.clone(), &self.spec)
    }

    fn relay<P: Publisher>(
        &self,
        config: LogRelayConfig,
        publisher: P,
    ) -> anyhow::Result<Relay<LogOutbox<SqliteLog, SqliteLogRelayStore>, P>> {
        Ok(log_relay(
            self.log.clone(),
            self.state.clone(),
            publisher,
            config,
            fast(),
        )?)
    }

    async fn stream_messages(&self) -> anyhow::Result<u64> {
        let js = async_nats::jetstream::new(self.client.clone());
        let mut stream = js.get_stream(&self.spec.name).await?;
        Ok(stream.info().await?.state.messages)
    }

    async fn checkpoint(&self, name: &str) -> anyhow::Result<u64> {
        Ok(self.state.load(name).await?.checkpoint)
    }

    /// Consume `topics` into the inbox until `want` effects (bounded), and
    /// return the effects in application order.
    async fn consume(
        &self,
        topics: &[&str],
        want: usize,
    ) -> anyhow::Result<Vec<(String, String, i64)>> {
        let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        let sub = NatsSubscriber::new(self.client.clone(), &self.spec, "billing", &topics).await?;
        let mut cfg = ConsumerConfig::new("billing");
        cfg.fetch_wait = Duration::from_millis(200);
        let mut c = Consumer::new(
            SqliteInbox::new(self.b.clone()),
            sub,
            Recorder::default(),
            cfg,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let effects = self.effects().await?;
            if effects.len() >= want || Instant::now() >= deadline {
                // one more round: anything beyond `want` would show up
                c.run_once().await?;
                return self.effects().await;
            }
            c.run_once().await?;
        }
    }

    async fn effects(&self) -> anyhow::Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query("SELECT message_id, k, seq FROM effects ORDER BY n")
            .fetch_all(&self.b)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    async fn cleanup(&self) {
        let js = async_nats::jetstream::new(self.client.clone());
        let _ = js.delete_stream(&self.spec.name).await;
    }
}

fn fast() -> RelayConfig {
    RelayConfig {
        poll_interval: Duration::from_millis(50),
        lease_ttl: Duration::from_secs(2),
        ..RelayConfig::default()
    }
}

/// Step the relay until a step handles nothing.
async fn drain<S: OutboxStore, P: Publisher>(relay: &mut Relay<S, P>) -> anyhow::Result<()> {
    for _ in 0..1000 {
        if relay.step().await? == 0 {
            return Ok(());
        }
    }
    anyhow::bail!("the relay did not go idle in 1000 steps")
}

#[tokio::test]
async fn each_event_published_once_and_the_inbox_dedupes_by_event_id() -> anyhow::Result<()> {
    let Some(env) = Env::new(None).await? else {
        return Ok(());
    };
    for i in 0..4 {
        env.append(&format!("order-{i}"), 1..=10).await?;
    }
    let config = LogRelayConfig::new("orders").default_topic("steps");
    let mut relay = env.relay(config.clone(), env.publisher())?.with_id("r1");
    drain(&mut relay).await?;
    assert_eq!(relay.stats().published, 40);
    assert_eq!(env.stream_messages().await?, 40);
    assert_eq!(env.checkpoint("orders").await?, env.log.head().await?);
    // stopping releases the lease
    let stopped = CancellationToken::new();
    stopped.cancel();
    relay.run(stopped).await?;

    // a second relay (a restart) publishes nothing again
    let mut again = env.relay(config, env.publisher())?.with_id("r2");
    drain(&mut again).await?;
    assert_eq!(again.partitions(), &[0]);
    assert_eq!(again.stats().published, 0, "the checkpoint holds");

    let effects = env.consume(&["steps"], 40).await?;
    let v = verdict(&effects);
    assert_eq!((v.applied, v.distinct, v.order_violations), (40, 40, 0));
    // message id = event id: the journal names every effect's event
    let ids: Vec<uuid::Uuid> = effects
        .iter()
        .map(|e| e.0.parse())
        .collect::<Result<_, _>>()?;
    let journal = env.state.entries_by_id(&ids).await?;
    assert_eq!(journal.len(), 40);
    assert!(journal
        .iter()
        .all(|(r, e)| r == "orders" && e.sequence.is_some()));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_category_filter_publishes_only_that_category() -> anyhow::Result<()> {
    let Some(env) = Env::new(None).await? else {
        return Ok(());
    };
    env.append("order-1", 1..=5).await?;
    env.append("invoice-1", 1..=5).await?;
    env.append("order-2", 1..=5).await?;
    let config = LogRelayConfig::new("orders-only")
        .category("order")
        .topic_for("order", "orders");
    let mut relay = env.relay(config, env.publisher())?.with_id("r");
    drain(&mut relay).await?;
    assert_eq!(relay.stats().published, 10);
    assert_eq!(env.stream_messages().await?, 10);
    // the checkpoint passes the other category's events too
    assert_eq!(env.checkpoint("orders-only").await?, env.log.head().await?);
    let effects = env.consume(&["orders"], 10).await?;
    assert_eq!(effects.len(), 10);
    assert!(
        effects.iter().all(|(_, k, _)| k.starts_with("order-")),
        "{effects:?}"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn two_log_relays_with_one_name_one_is_active() -> anyhow::Result<()> {
    let Some(env) = Env::new(None).await? else {
        return Ok(());
    };
    env.append("order-1", 1..=5).await?;
    let config = LogRelayConfig::new("single");
    let a = LogOutbox::new(env.log.clone(), env.state.clone(), config.clone())?;
    let b = LogOutbox::new(env.log.clone(), env.state.clone(), config)?;
    let now = chrono::Utc::now();
    let ttl = Duration::from_secs(30);
    assert_eq!(a.acquire_leases("pa", ttl, now).await?, vec![0]);
    assert!(
        b.acquire_leases("pb", ttl, now).await?.is_empty(),
        "b is a standby"
    );
    assert!(b.fetch_batch(&[0], 10, now).await?.is_empty());
    // b's writes are fenced even if it tried
    assert_eq!(
        b.mark_published("pb", &[(1, Default::default())], now)
            .await?,
        0
    );
    assert_eq!(a.fetch_batch(&[0], 10, now).await?.len(), 5);
    // the lease expires (a dies without releasing): b takes over
    let later = now + chrono::Duration::seconds(31);
    assert_eq!(b.acquire_leases("pb", ttl, later).await?, vec![0]);
    assert!(a.acquire_leases("pa", ttl, later).await?.is_empty());
    // a's late write is refused: its token is no longer the current one
    assert_eq!(
        a.mark_published("pa", &[(1, Default::default())], later)
            .await?,
        0
    );
    assert_eq!(b.fetch_batch(&[0], 10, later).await?.len(), 5);
    b.release_leases("pb").await?;
    assert_eq!(
        a.acquire_leases("pa", ttl, later).await?,
        vec![0],
        "released: taken at once"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn broker_outage_while_events_keep_coming_loses_nothing_keeps_order() -> anyhow::Result<()> {
    let Some(mut server) = NatsServer::start().await? else {
        return Ok(());
    };
    let Some(env) = Env::new(Some(&server.url)).await? else {
        return Ok(());
    };
    let mut cfg = fast();
    cfg.breaker.open_for = Duration::from_millis(300);
    let publisher = env.publisher().with_ack_timeout(Duration::from_secs(1));
    let cancel = CancellationToken::new();
    let relay = tokio::spawn(
        log_relay(
            env.log.clone(),
            env.state.clone(),
            publisher,
            LogRelayConfig::new("outage").default_topic("steps"),
            cfg,
        )?
        .run(cancel.clone()),
    );
    let streams = ["acct-1", "acct-2", "acct-3"];
    for s in streams {
        env.append(s, 1..=10).await?;
    }
    server.stop(); // kill -9 of the broker
    for s in streams {
        env.append(s, 11..=60).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let head = env.log.head().await?;
    assert!(
        env.checkpoint("outage").await? < head,
        "the checkpoint must not pass events the broker never acknowledged"
    );
    server.restart().await?;
    let reached = custody_testkit::process::poll_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async { env.checkpoint("outage").await },
        |c| *c >= head,
    )
    .await?;
    assert_eq!(
        reached, head,
        "the backlog drained after the broker came back"
    );
    cancel.cancel();
    let stats = relay.await??;
    assert_eq!(stats.dead_lettered, 0, "an outage dead-letters nothing");
    let effects = env.consume(&["steps"], 180).await?;
    let v = verdict(&effects);
    assert_eq!((v.applied, v.distinct, v.order_violations), (180, 180, 0));
    env.cleanup().await;
    Ok(())
}

/// The child of the kill -9 test: runs a log relay whose publisher prints
/// `ACKED <n>` after each transport ack and hangs after the fourth, so the
/// parent kills it between publish and checkpoint. Does nothing in a
/// normal test run.
#[tokio::test]
async fn child_log_relay_for_kill_test() -> anyhow::Result<()> {
    let (Ok(db), Ok(url), Ok(spec)) = (
        std::env::var("LOG_RELAY_CHILD_DB"),
        std::env::var("LOG_RELAY_CHILD_NATS"),
        std::env::var("LOG_RELAY_CHILD_STREAM"),
    ) else {
        return Ok(());
    };
    let pool = custody_sqlite::connect(&db).await?;
    let client = custody_nats::connect(&url).await?;
    let spec = StreamSpec::new(&spec.to_uppercase(), &spec);
    struct Printing(NatsPublisher, std::sync::atomic::AtomicUsize);
    impl Publisher for Printing {
        async fn publish(
            &self,
            message: &custody_core::Message,
        ) -> custody_core::Result<custody_core::PublishAck> {
            let ack = self.0.publish(message).await?;
            let n = self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            println!("ACKED {n}");
            if n >= 4 {
                std::future::pending::<()>().await;
            }
            Ok(ack)
        }
    }
    let relay = log_relay(
        SqliteLog::new(pool.clone()),
        SqliteLogRelayStore::new(pool),
        Printing(NatsPublisher::new(client, &spec), Default::default()),
        LogRelayConfig::new("killed").default_topic("steps"),
        RelayConfig {
            max_concurrent_keys: 1,
            ..fast()
        },
    )?;
    relay.run(CancellationToken::new()).await?;
    Ok(())
}

#[tokio::test]
async fn relay_killed_between_publish_and_checkpoint_republishes_effect_once() -> anyhow::Result<()>
{
    let Some(env) = Env::new(None).await? else {
        return Ok(());
    };
    env.append("order-1", 1..=6).await?;
    env.append("order-2", 1..=6).await?;
    let exe = std::env::current_exe()?;
    let db = env.db_path();
    let subject = env.spec.subject("x");
    let prefix = subject.trim_end_matches(".x").to_owned();
    let mut child = custody_testkit::process::Proc::start(
        "log relay child",
        &exe.to_string_lossy(),
        &["--exact", "child_log_relay_for_kill_test", "--nocapture"],
        &[
            ("LOG_RELAY_CHILD_DB", db.as_str()),
            ("LOG_RELAY_CHILD_NATS", env.url.as_str()),
            ("LOG_RELAY_CHILD_STREAM", prefix.as_str()),
        ],
    )?;
    child.wait_line("ACKED 4", Duration::from_secs(30)).await?;
    child.kill().await?; // kill -9 after the ack, before the checkpoint write
    let acked_before = env.stream_messages().await?;
    assert!(acked_before >= 4, "the child published {acked_before}");
    assert!(
        env.checkpoint("killed").await? < 4,
        "the batch in flight was not checkpointed"
    );

    // the lease of the dead process expires; a new relay takes over
    let mut relay = env
        .relay(
            LogRelayConfig::new("killed").default_topic("steps"),
            env.publisher(),
        )?
        .with_id("after");
    let deadline = Instant::now() + Duration::from_secs(20);
    while relay.partitions().is_empty() || relay.stats().published < 12 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no takeover: {:?}",
            relay.stats()
        );
        if relay.step().await? == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        relay.stats().published,
        12,
        "everything after the checkpoint republished"
    );
    assert!(
        relay.stats().duplicates >= 4,
        "JetStream recognised the republished ids"
    );
    assert_eq!(env.stream_messages().await?, 12);
    let effects = env.consume(&["steps"], 12).await?;
    let v = verdict(&effects);
    assert_eq!((v.applied, v.distinct, v.order_violations), (12, 12, 0));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn reconcile_event_store_against_inbox_names_missing_ids_and_repairs() -> anyhow::Result<()> {
    use custody_core::{ReconcileQuery, SentHistory};
    use custody_engine::log_relay::EventLogHistory;
    let Some(env) = Env::new(None).await? else {
        return Ok(());
    };
    let from = chrono::Utc::now() - chrono::Duration::minutes(1);
    env.append("order-1", 1..=6).await?;
    env.append("order-2", 1..=6).await?;
    let config = LogRelayConfig::new("recon").default_topic("steps");
    let mut relay = env.relay(config.clone(), env.publisher())?.with_id("r");
    drain(&mut relay).await?;
    assert_eq!(env.consume(&["steps"], 12).await?.len(), 12);
    // three more are published, but the consumer has not received them
    env.append("order-3", 1..=3).await?;
    drain(&mut relay).await?;
    assert_eq!(relay.stats().published, 15);
    let missed: Vec<uuid::Uuid> = {
        let slice = env.log.read_all(0, &Default::default(), 100).await?;
        let mut ids: Vec<_> = slice
            .events
            .iter()
            .filter(|e| e.stream == "order-3")
            .map(|e| e.id)
            .collect();
        ids.sort();
        ids
    };
    let to = chrono::Utc::now() + chrono::Duration::minutes(1);
    let q = |topic: &str| ReconcileQuery {
        topic: topic.into(),
        consumer: "billing".into(),
        from,
        to,
        window: Duration::from_secs(3600),
    };
    let inbox = SqliteInbox::new(env.b.clone());
    let no_progress = |_: custody_engine::reconcile::Progress| {};
    let history = EventLogHistory::new(env.log.clone(), env.state.clone(), config.clone())?;
    let report =
        custody_engine::reconcile::reconcile(&history, &inbox, &q("steps"), &no_progress).await?;
    assert_eq!(report.sent, 15);
    assert_eq!(report.processed, 12);
    assert_eq!(report.missing, missed, "{report:#?}");
    assert!(report.unexpected.is_empty());

    // a topic the relay never published compares nothing: not OK (invariant 8)
    let nothing =
        custody_engine::reconcile::reconcile(&history, &inbox, &q("nothing"), &no_progress).await?;
    assert!(nothing.compared_nothing(), "{nothing:#?}");

    // repair: the journal puts them back, the running relay republishes
    assert_eq!(history.republish(&report.missing).await?, 3);
    // the relay sees the change at its next lease renewal (a third of the ttl)
    let deadline = Instant::now() + Duration::from_secs(20);
    while relay.stats().published < 18 && Instant::now() < deadline {
        if relay.step().await? == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        relay.stats().published,
        18,
        "the three were published again"
    );
    let effects = env.consume(&["steps"], 15).await?;
    let v = verdict(&effects);
    assert_eq!((v.applied, v.distinct, v.order_violations), (15, 15, 0));
    let history = EventLogHistory::new(env.log.clone(), env.state.clone(), config)?;
    let again =
        custody_engine::reconcile::reconcile(&history, &inbox, &q("steps"), &no_progress).await?;
    assert!(again.is_clean() && !again.compared_nothing(), "{again:#?}");
    env.cleanup().await;
    Ok(())
}

/// PostgreSQL event store + log relay state in database A, inbox in B.
mod pg {
    use super::*;
    use custody_postgres::{PgEventStore, PgInbox, PgLogRelayStore};

    async fn append(
        log: &PgEventStore,
        stream: &str,
        seqs: std::ops::RangeInclusive<i64>,
    ) -> anyhow::Result<()> {
        for seq in seqs {
            let e = EventData::json(
                "Step",
                &Step {
                    key: stream.to_owned(),
                    seq,
                },
            )?;
            log.append(stream, ExpectedVersion::Any, vec![e]).await?;
        }
        Ok(())
    }

    async fn pg_effects(b: &sqlx::PgPool) -> anyhow::Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query("SELECT message_id::text, k, seq FROM effects ORDER BY n")
            .fetch_all(b)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    async fn consume(e: &common::Env, want: usize) -> anyhow::Result<Vec<(String, String, i64)>> {
        let sub = e.billing_subscriber().await?;
        let mut cfg = ConsumerConfig::new("billing");
        cfg.fetch_wait = Duration::from_millis(200);
        let mut c = Consumer::new(PgInbox::new(e.b.clone()), sub, Recorder::default(), cfg);
        let deadline = Instant::now() + Duration::from_secs(30);
        while pg_effects(&e.b).await?.len() < want && Instant::now() < deadline {
            c.run_once().await?;
        }
        c.run_once().await?;
        pg_effects(&e.b).await
    }

    #[tokio::test]
    async fn pg_each_event_published_once_filter_and_one_active_relay() -> anyhow::Result<()> {
        let Some(e) = common::env(None, "custody_logpg").await? else {
            return Ok(());
        };
        let log = PgEventStore::new(e.a.clone());
        let state = PgLogRelayStore::new(e.a.clone());
        for i in 0..3 {
            append(&log, &format!("order-{i}"), 1..=10).await?;
            append(&log, &format!("invoice-{i}"), 1..=2).await?;
        }
        let config = LogRelayConfig::new("pg-orders")
            .category("order")
            .topic_for("order", "steps");
        let mut relay = log_relay(
            log.clone(),
            state.clone(),
            NatsPublisher::new(e.client.clone(), &e.spec),
            config.clone(),
            fast(),
        )?
        .with_id("p1");
        // a second process with the same relay name stands by
        let mut standby = log_relay(
            log.clone(),
            state.clone(),
            NatsPublisher::new(e.client.clone(), &e.spec),
            config,
            fast(),
        )?
        .with_id("p2");
        drain(&mut relay).await?;
        drain(&mut standby).await?;
        assert_eq!(relay.stats().published, 30, "only the order category");
        assert_eq!(standby.stats().published, 0);
        assert!(standby.partitions().is_empty(), "one active relay per name");
        assert_eq!(state.load("pg-orders").await?.checkpoint, log.head().await?);
        let js = async_nats::jetstream::new(e.client.clone());
        assert_eq!(
            js.get_stream(&e.spec.name)
                .await?
                .info()
                .await?
                .state
                .messages,
            30
        );
        let effects = consume(&e, 30).await?;
        let v = verdict(&effects);
        assert_eq!((v.applied, v.distinct, v.order_violations), (30, 30, 0));
        Ok(())
    }

    #[tokio::test]
    async fn pg_broker_outage_loses_nothing_keeps_order() -> anyhow::Result<()> {
        let Some(mut server) = NatsServer::start().await? else {
            return Ok(());
        };
        let Some(e) = common::env(Some(&server.url), "custody_logpg").await? else {
            return Ok(());
        };
        let log = PgEventStore::new(e.a.clone());
        let state = PgLogRelayStore::new(e.a.clone());
        let mut cfg = fast();
        cfg.breaker.open_for = Duration::from_millis(300);
        let cancel = CancellationToken::new();
        let relay = tokio::spawn(
            log_relay(
                log.clone(),
                state.clone(),
                NatsPublisher::new(e.client.clone(), &e.spec)
                    .with_ack_timeout(Duration::from_secs(1)),
                LogRelayConfig::new("pg-outage").default_topic("steps"),
                cfg,
            )?
            .run(cancel.clone()),
        );
        for s in ["acct-1", "acct-2"] {
            append(&log, s, 1..=10).await?;
        }
        server.stop(); // kill -9 of the broker
        for s in ["acct-1", "acct-2"] {
            append(&log, s, 11..=50).await?;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let head = log.head().await?;
        assert!(state.load("pg-outage").await?.checkpoint < head);
        server.restart().await?;
        let reached = custody_testkit::process::poll_until(
            Duration::from_secs(60),
            Duration::from_millis(100),
            || async { Ok(state.load("pg-outage").await?.checkpoint) },
            |c| *c >= head,
        )
        .await?;
        assert_eq!(
            reached, head,
            "the backlog drained after the broker came back"
        );
        cancel.cancel();
        assert_eq!(relay.await??.dead_lettered, 0);
        let effects = consume(&e, 100).await?;
        let v = verdict(&effects);
        assert_eq!((v.applied, v.distinct, v.order_violations), (100, 100, 0));
        Ok(())
    }
}

/// Refuses events of type `Poison` for good, as a transport refuses a
/// message it can never store; passes the rest to `inner`.
struct RefusePoison(NatsPublisher);

impl Publisher for RefusePoison {
    async fn publish(
        &self,
        message: &custody_core::Message,
    ) -> custody_core::Result<custody_core::PublishAck> {
        if message.message_type == "Poison" {
            return Err(custody_core::Error::rejected(
                "test transport",
                "publish",
                "this transport never stores a Poison",
            ));
        }
        self.0.publish(message).await
    }
}

#[tokio::test]
async fn refused_event_is_dead_lettered_and_its_number_skipped() -> anyhow::Result<()> {
    use custody_core::log_relay::JournalStatus;
    let Some(env) = Env::new(None).await? else {
        return Ok(());
    };
    env.append("order-1", 1..=2).await?;
    let poison = EventData::json("Poison", &serde_json::json!({}))?;
    let poison_id = poison.id;
    env.log
        .append("order-1", ExpectedVersion::Any, vec![poison])
        .await?;
    env.append("order-1", 3..=4).await?;
    let mut relay = env
        .relay(
            LogRelayConfig::new("dl").default_topic("steps"),
            RefusePoison(env.publisher()),
        )?
        .with_id("r");
    drain(&mut relay).await?;
    assert_eq!(relay.stats().dead_lettered, 1);
    // four events and the skip marker in the poison's place
    assert_eq!(relay.stats().published, 5);
    assert_eq!(env.stream_messages().await?, 5);
    assert_eq!(env.checkpoint("dl").await?, env.log.head().await?);
    let journal = env.state.entries_by_id(&[poison_id]).await?;
    assert_eq!(journal.len(), 1);
    let (_, dead) = &journal[0];
    assert_eq!(dead.status, JournalStatus::DeadSettled);
    assert_eq!(dead.sequence, Some(3), "the number stays the poison's");
    assert!(
        dead.error
            .as_deref()
            .unwrap_or_default()
            .contains("never stores a Poison"),
        "{dead:?}"
    );
    let effects = env.consume(&["steps"], 4).await?;
    let v = verdict(&effects);
    assert_eq!((v.applied, v.distinct, v.order_violations), (4, 4, 0));
    let progress =
        custody_core::InboxStore::progress(&SqliteInbox::new(env.b.clone()), "billing").await?;
    assert_eq!(progress.len(), 1, "{progress:?}");
    assert_eq!(
        (progress[0].high, progress[0].holes),
        (5, 0),
        "the marker accounts for number 3"
    );
    env.cleanup().await;
    Ok(())
}
