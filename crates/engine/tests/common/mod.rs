//! Shared pieces of the end-to-end tests: a handler that records its effect,
//! and checks over the recorded effects.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use custody_core::{Handler, HandlerError, Message};
use custody_nats::StreamSpec;
use custody_postgres::PgOutbox;
use custody_testkit::{postgres_db, unique_name, PgTestDb};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::Notify;

/// The test payload: a per-key sequence number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub key: String,
    pub seq: i64,
}

pub fn step_message(topic: &str, key: &str, seq: i64) -> Message {
    Message::builder(topic, key, "Step")
        .json(&Step {
            key: key.to_owned(),
            seq,
        })
        .expect("json")
        .build()
        .expect("valid message")
}

pub const EFFECTS_SQLITE: &str =
    "CREATE TABLE effects (n INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL, k TEXT NOT NULL, seq INTEGER NOT NULL)";
pub const EFFECTS_PG: &str =
    "CREATE TABLE effects (n BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, message_id UUID NOT NULL, k TEXT NOT NULL, seq BIGINT NOT NULL)";

/// Records each message as a row of `effects`. When `hang_after_effect` is
/// set, the first message it sees has its effect written and then the
/// handler never returns (the test kills the consumer at that point).
#[derive(Clone, Default)]
pub struct Recorder {
    pub hang_after_effect: Arc<AtomicBool>,
    pub reached: Arc<Notify>,
}

fn decode(msg: &Message) -> Result<Step, HandlerError> {
    if msg.message_type != "Step" {
        return Err(HandlerError::UnknownType(msg.message_type.clone()));
    }
    Ok(msg.decode_json::<Step>()?)
}

impl Recorder {
    async fn maybe_hang(&self) {
        if self.hang_after_effect.swap(false, Ordering::SeqCst) {
            self.reached.notify_one();
            std::future::pending::<()>().await;
        }
    }
}

impl Handler<sqlx::Transaction<'static, sqlx::Sqlite>> for Recorder {
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        msg: &Message,
    ) -> Result<(), HandlerError> {
        let s = decode(msg)?;
        sqlx::query("INSERT INTO effects (message_id, k, seq) VALUES (?, ?, ?)")
            .bind(msg.id.to_string())
            .bind(&s.key)
            .bind(s.seq)
            .execute(&mut **tx)
            .await
            .map_err(HandlerError::transient)?;
        self.maybe_hang().await;
        Ok(())
    }
}

impl Handler<sqlx::Transaction<'static, sqlx::Postgres>> for Recorder {
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        msg: &Message,
    ) -> Result<(), HandlerError> {
        let s = decode(msg)?;
        sqlx::query("INSERT INTO effects (message_id, k, seq) VALUES ($1, $2, $3)")
            .bind(msg.id)
            .bind(&s.key)
            .bind(s.seq)
            .execute(&mut **tx)
            .await
            .map_err(HandlerError::transient)?;
        self.maybe_hang().await;
        Ok(())
    }
}

/// Checks over effects read in application order: (message id, key, seq).
pub struct Verdict {
    pub applied: usize,
    pub distinct: usize,
    pub order_violations: usize,
}

pub fn verdict(effects: &[(String, String, i64)]) -> Verdict {
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut order_violations = 0;
    let mut ids = std::collections::HashSet::new();
    for (id, k, seq) in effects {
        ids.insert(id.clone());
        let prev = last.entry(k.as_str()).or_insert(0);
        if *seq <= *prev {
            order_violations += 1;
        }
        *prev = (*prev).max(*seq);
    }
    Verdict {
        applied: effects.len(),
        distinct: ids.len(),
        order_violations,
    }
}

/// Publishes through `inner`, then after `crash_after` acks never returns:
/// the relay dies between the transport's ack and marking the row.
pub struct CrashAfterPublish<P> {
    pub inner: P,
    pub published: std::sync::atomic::AtomicUsize,
    pub crash_after: usize,
    pub reached: Arc<Notify>,
}

impl<P: custody_core::Publisher> custody_core::Publisher for CrashAfterPublish<P> {
    async fn publish(&self, message: &Message) -> custody_core::Result<custody_core::PublishAck> {
        let ack = self.inner.publish(message).await?;
        if self.published.fetch_add(1, Ordering::SeqCst) + 1 >= self.crash_after {
            self.reached.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(ack)
    }
}

/// Two PostgreSQL databases (A: producer, B: consumer, with `effects`) and a
/// JetStream stream of their own, deleted on drop.
pub struct Env {
    pub nats_url: String,
    pub _a_db: PgTestDb,
    pub _b_db: PgTestDb,
    pub a: PgPool,
    pub b: PgPool,
    pub outbox: PgOutbox,
    pub client: async_nats::Client,
    pub spec: StreamSpec,
}

/// `None` when a service is missing (and `CUSTODY_REQUIRE_SERVICES` is unset).
pub async fn env(nats_url: Option<&str>, stream: &str) -> anyhow::Result<Option<Env>> {
    let Some(a_db) = postgres_db().await? else {
        return Ok(None);
    };
    let Some(b_db) = postgres_db().await? else {
        return Ok(None);
    };
    let nats_url = match nats_url {
        Some(u) => u.to_owned(),
        None => match custody_testkit::nats().await? {
            Some(u) => u,
            None => return Ok(None),
        },
    };
    let a = custody_postgres::connect(&a_db.url).await?;
    let b = custody_postgres::connect(&b_db.url).await?;
    custody_postgres::migrate(&a).await?;
    custody_postgres::migrate(&b).await?;
    sqlx::query(EFFECTS_PG).execute(&b).await?;
    let client = custody_nats::connect(&nats_url).await?;
    let name = unique_name(stream);
    let spec = StreamSpec::new(&name.to_uppercase(), &name);
    custody_nats::ensure_stream(&client, &spec).await?;
    Ok(Some(Env {
        nats_url,
        outbox: PgOutbox::new(a.clone()),
        _a_db: a_db,
        _b_db: b_db,
        a,
        b,
        client,
        spec,
    }))
}

/// Delete the test's stream even when an assertion failed before
/// `cleanup` (Drop runs outside the test's runtime: use a thread of its own).
impl Drop for Env {
    fn drop(&mut self) {
        let (url, name) = (self.nats_url.clone(), self.spec.name.clone());
        custody_testkit::block_on_own_runtime(async move {
            if let Ok(client) = custody_nats::connect(&url).await {
                let _ = async_nats::jetstream::new(client)
                    .delete_stream(&name)
                    .await;
            }
        });
    }
}

impl Env {
    /// The "billing" consumer's JetStream subscription to topic `steps`
    /// (5 s ack wait, so a test sees a redelivery soon).
    pub async fn billing_subscriber(&self) -> anyhow::Result<custody_nats::NatsSubscriber> {
        Ok(custody_nats::NatsSubscriber::with_options(
            self.client.clone(),
            &self.spec,
            "billing",
            &["steps".to_owned()],
            custody_nats::SubscriberOptions {
                ack_wait: std::time::Duration::from_secs(5),
                ..custody_nats::SubscriberOptions::default()
            },
        )
        .await?)
    }
}
