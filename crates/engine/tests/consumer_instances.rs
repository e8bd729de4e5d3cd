//! Several instances of one consumer (PostgreSQL inbox, NATS JetStream),
//! started, killed and fenced off at random while messages flow: per key
//! every message is applied once, in publish order.

mod common;

use std::time::Duration;

use common::{env, Step};
use custody_core::{Handler, HandlerError, Message, Publisher};
use custody_engine::{CancellationToken, ConsumerConfig, LeaseConfig, LeasedConsumer};
use custody_nats::{NatsPublisher, NatsSubscriber, SubscriberOptions};
use custody_postgres::PgInbox;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::{Postgres, Transaction};
use tokio::task::JoinHandle;

const KEYS: i64 = 8;
const PER_KEY: i64 = 60;

const TABLES: &str = "\
CREATE TABLE key_state (k TEXT PRIMARY KEY, last BIGINT NOT NULL);
CREATE TABLE applied (message_id UUID NOT NULL, k TEXT NOT NULL, seq BIGINT NOT NULL, prev BIGINT NOT NULL, instance TEXT NOT NULL)";

/// Applies a step and records what the key's last applied step was, read
/// under the key's row lock: the order in which a key's effects commit.
#[derive(Clone)]
struct Ordered {
    instance: String,
}

impl Handler<Transaction<'static, Postgres>> for Ordered {
    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        msg: &Message,
    ) -> Result<(), HandlerError> {
        let s: Step = msg.decode_json()?;
        let prev: Option<i64> =
            sqlx::query_scalar("SELECT last FROM key_state WHERE k = $1 FOR UPDATE")
                .bind(&s.key)
                .fetch_optional(&mut **tx)
                .await
                .map_err(HandlerError::transient)?;
        sqlx::query("INSERT INTO key_state (k, last) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET last = EXCLUDED.last")
            .bind(&s.key)
            .bind(s.seq)
            .execute(&mut **tx)
            .await
            .map_err(HandlerError::transient)?;
        sqlx::query(
            "INSERT INTO applied (message_id, k, seq, prev, instance) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(msg.id)
        .bind(&s.key)
        .bind(s.seq)
        .bind(prev.unwrap_or(0))
        .bind(&self.instance)
        .execute(&mut **tx)
        .await
        .map_err(HandlerError::transient)?;
        Ok(())
    }
}

/// One instance: its own PostgreSQL pool and NATS connection.
async fn instance(
    db_url: String,
    nats_url: String,
    spec: custody_nats::StreamSpec,
    name: String,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let pool = custody_postgres::connect(&db_url).await?;
    let client = custody_nats::connect(&nats_url).await?;
    let config = ConsumerConfig {
        batch_size: 20,
        fetch_wait: Duration::from_millis(200),
        ..ConsumerConfig::new("billing")
    };
    let lease = LeaseConfig {
        holder: name.clone(),
        ttl: Duration::from_millis(1500),
        renew_interval: Duration::from_millis(300),
    };
    let topics = vec!["steps".to_owned()];
    LeasedConsumer::new(PgInbox::new(pool), config, lease)
        .run(
            || {
                NatsSubscriber::with_options(
                    client.clone(),
                    &spec,
                    "billing",
                    &topics,
                    SubscriberOptions {
                        ack_wait: Duration::from_secs(2),
                        ..SubscriberOptions::default()
                    },
                )
            },
            || Ordered {
                instance: name.clone(),
            },
            cancel,
        )
        .await?;
    Ok(())
}

struct Running {
    handle: JoinHandle<anyhow::Result<()>>,
    cancel: CancellationToken,
}

async fn scenario(instances: usize, seed: u64) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let Some(env) = env(None, "inst").await? else {
        return Ok(());
    };
    let b_url = env._b_db.url.clone();
    sqlx::raw_sql(TABLES).execute(&env.b).await?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut generation = 0u32;
    let start = |slot: usize, generation: &mut u32| {
        *generation += 1;
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(instance(
            b_url.clone(),
            env.nats_url.clone(),
            env.spec.clone(),
            format!("i{slot}-g{generation}"),
            cancel.clone(),
        ));
        Running { handle, cancel }
    };
    let mut running: Vec<Running> = (0..instances).map(|i| start(i, &mut generation)).collect();

    // publish while the instances come and go
    let publisher = NatsPublisher::new(env.client.clone(), &env.spec);
    let publishing = tokio::spawn(async move {
        for seq in 1..=PER_KEY {
            for k in 0..KEYS {
                let m = common::step_message("steps", &format!("k{k}"), seq);
                publisher.publish(&m).await?;
            }
            tokio::time::sleep(Duration::from_millis(130)).await;
        }
        anyhow::Ok(())
    });

    let mut kills = 0;
    let mut takeovers = 0;
    for _ in 0..24 {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(150..500))).await;
        let slot = rng.gen_range(0..instances);
        match rng.gen_range(0..3) {
            // kill -9 of an instance: its task and connections vanish mid-work
            0 | 1 => {
                running[slot].handle.abort();
                kills += 1;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..300))).await;
                running[slot] = start(slot, &mut generation);
            }
            // the active instance stalls past its lease (its clock, a GC
            // pause): the lease expires under it and a standby takes over
            _ => {
                sqlx::query(
                    "UPDATE custody_consumer_lease SET expires_at = now() - interval '1 hour'",
                )
                .execute(&env.b)
                .await?;
                takeovers += 1;
            }
        }
    }
    publishing.await??;

    // everything arrives, once
    let total = KEYS * PER_KEY;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(DISTINCT message_id) FROM applied")
            .fetch_one(&env.b)
            .await?;
        if n == total {
            break;
        }
        for r in &mut running {
            if r.handle.is_finished() {
                let slot = &mut r.handle;
                let ended = slot.await;
                anyhow::bail!("an instance ended by itself: {ended:?} (seed {seed})");
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {n} of {total} messages applied (seed {seed})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for r in &running {
        r.cancel.cancel();
    }
    for r in running {
        r.handle.await??;
    }
    let (rows, distinct, violations, holders): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT message_id), count(*) FILTER (WHERE seq <> prev + 1), count(DISTINCT instance) FROM applied",
    )
    .fetch_one(&env.b)
    .await?;
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM custody_dead_letter")
        .fetch_one(&env.b)
        .await?;
    eprintln!(
        "{instances} instances, seed {seed}: {kills} kills, {takeovers} forced takeovers, {rows} effects by {holders} instance runs, {violations} order violations, {} duplicate effects, {dead} dead letters",
        rows - distinct
    );
    assert_eq!(rows, distinct, "duplicate effects (seed {seed})");
    assert_eq!(violations, 0, "per-key order violations (seed {seed})");
    assert_eq!(dead, 0, "dead letters (seed {seed})");
    assert!(holders > 1, "the work moved between instances");
    Ok(())
}

fn seed() -> u64 {
    std::env::var("CUSTODY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_killed_and_taken_over_at_random_apply_each_key_once_in_order(
) -> anyhow::Result<()> {
    scenario(2, seed()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_killed_and_taken_over_at_random_apply_each_key_once_in_order(
) -> anyhow::Result<()> {
    scenario(3, seed()).await
}
