//! The processes chaos starts and kills: the producer (service A) and the
//! flaky billing consumer (service B).

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use custody::nats::{NatsSubscriber, StreamSpec};
use custody::postgres::{self, PgInbox, PgOutbox};
use custody::sqlite::{self, SqliteInbox, SqliteOutbox};
use custody::{
    Consumer, ConsumerConfig, Handler, HandlerError, LeaseConfig, LeasedConsumer, Message,
    CONTENT_TYPE_JSON,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use crate::billing::{PgBilling, SqliteBilling};
use crate::producer::{produce_pg, produce_sqlite};
use crate::{Role, Step, WorkerArgs};

/// Header that marks the producer's deliberately bad messages, with the kind
/// of badness: the harness checks that each of them is dead-lettered.
pub const BAD_HEADER: &str = "chaosbad";
/// The consumer's name (inbox, dead letters, durable).
pub const CONSUMER: &str = "billing";
/// Payload size of the oversized messages: above NATS' default max_payload (1 MiB).
pub const OVERSIZED: usize = 1536 * 1024;

#[derive(Debug, Clone, Copy)]
enum Bad {
    Malformed,
    Oversized,
    WrongContentType,
    /// A JSON body labelled `text/plain`: `decode_json` must refuse it.
    TextPlainJson,
    UnknownType,
}

impl Bad {
    fn name(self) -> &'static str {
        match self {
            Bad::Malformed => "malformed",
            Bad::Oversized => "oversized",
            Bad::WrongContentType => "wrongcontenttype",
            Bad::TextPlainJson => "textplainjson",
            Bad::UnknownType => "unknowntype",
        }
    }

    fn message(self) -> anyhow::Result<Message> {
        let b = match self {
            Bad::Malformed => Message::builder("orders", "bad-malformed", "OrderPlaced")
                .payload(CONTENT_TYPE_JSON, b"{\"order_id\": oops".to_vec()),
            Bad::Oversized => {
                let mut p = b"{\"pad\":\"".to_vec();
                p.resize(OVERSIZED, b'x');
                p.extend_from_slice(b"\"}");
                Message::builder("orders", "bad-oversized", "OrderPlaced")
                    .payload(CONTENT_TYPE_JSON, p)
            }
            Bad::WrongContentType => Message::builder("orders", "bad-contenttype", "OrderPlaced")
                .payload(
                    "application/xml",
                    b"<order><customer>x</customer></order>".to_vec(),
                ),
            Bad::TextPlainJson => {
                let order_id = Uuid::now_v7();
                Message::builder("orders", "bad-textplain", "OrderPlaced").payload(
                    "text/plain",
                    serde_json::to_vec(&serde_json::json!({
                        "order_id": order_id, "customer": "bad-textplain", "amount_cents": 1, "seq": 1
                    }))?,
                )
            }
            Bad::UnknownType => Message::builder("orders", "bad-unknowntype", "OrderGiftWrapped")
                .json(&serde_json::json!({ "ribbon": "red" }))?,
        };
        Ok(b.header(BAD_HEADER, self.name())?.build()?)
    }
}

/// What the producer commits next.
fn next(rng: &mut StdRng, customers: u64) -> anyhow::Result<Step> {
    let customer = format!("customer-{:03}", rng.gen_range(0..customers.max(1)));
    let bad = match rng.gen_range(0..1000) {
        0..=4 => Bad::Malformed,
        5..=7 => Bad::Oversized,
        8..=12 => Bad::WrongContentType,
        13..=15 => Bad::UnknownType,
        16..=18 => Bad::TextPlainJson,
        r => {
            return Ok(Step::Order {
                customer,
                roll_back: r <= 40,
            })
        }
    };
    Ok(Step::Event(bad.message()?))
}

fn log_rolled_back(args: &WorkerArgs, id: Uuid) -> anyhow::Result<()> {
    if let Some(p) = &args.rolled_back_log {
        // written before the rollback: if we are killed in between, the
        // transaction never commits either way
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)?;
        writeln!(f, "{id}")?;
    }
    Ok(())
}

/// The producer: one transaction per tick at `--rate`, each an order row and
/// its OrderPlaced event (some rolled back), now and then a bad message.
pub async fn produce(args: &WorkerArgs) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / args.rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let cancel = crate::process::shutdown_token();
    match args.role {
        Role::ProducePg => {
            let a = postgres::connect(&args.a).await?;
            let outbox = PgOutbox::new(a.clone());
            while !cancel.is_cancelled() {
                tick.tick().await;
                let step = next(&mut rng, args.customers);
                let result =
                    async { produce_pg(&a, &outbox, &step?, |id| log_rolled_back(args, id)).await };
                if let Err(e) = result.await {
                    tracing::warn!(error = %e, "producer transaction failed");
                }
            }
        }
        _ => {
            let a = sqlite::connect(&args.a).await?;
            let outbox = SqliteOutbox::new(a.clone());
            while !cancel.is_cancelled() {
                tick.tick().await;
                let step = next(&mut rng, args.customers);
                let result = async {
                    produce_sqlite(&a, &outbox, &step?, |id| log_rolled_back(args, id)).await
                };
                if let Err(e) = result.await {
                    tracing::warn!(error = %e, "producer transaction failed");
                }
            }
        }
    }
    Ok(())
}

/// Billing as the chaos run wants it: JSON only (the billing handler's
/// `decode_json` refuses another content type as a permanent error), and a
/// transient failure on a `flaky` share of attempts
/// — at most three per message, below the consumer's five attempts, so an
/// injected flake never turns into a dead letter on its own.
pub struct ChaosBilling<H> {
    inner: H,
    flaky: f64,
    state: Mutex<(StdRng, HashMap<Uuid, u32>)>,
}

impl<H> ChaosBilling<H> {
    fn new(inner: H, flaky: f64, seed: u64) -> Self {
        ChaosBilling {
            inner,
            flaky: flaky.clamp(0.0, 1.0),
            state: Mutex::new((StdRng::seed_from_u64(seed), HashMap::new())),
        }
    }

    fn flake(&self, id: Uuid) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (rng, counts) = &mut *s;
        if !rng.gen_bool(self.flaky) {
            return false;
        }
        let n = counts.entry(id).or_insert(0);
        *n += 1;
        *n <= 3
    }
}

impl<Tx: Send + 'static, H: Handler<Tx>> Handler<Tx> for ChaosBilling<H> {
    async fn handle(&self, tx: &mut Tx, msg: &Message) -> Result<(), HandlerError> {
        if self.flake(msg.id) {
            return Err(HandlerError::transient(
                "injected transient failure (chaos --flaky)",
            ));
        }
        self.inner.handle(tx, msg).await
    }
}

/// The flaky billing consumer (embedded SQLite or NATS → PostgreSQL).
pub async fn consume(args: &WorkerArgs) -> anyhow::Result<()> {
    let seed = std::process::id() as u64;
    let mut cfg = ConsumerConfig::new(CONSUMER);
    cfg.fetch_wait = Duration::from_millis(200);
    cfg.batch_size = 50;
    cfg.backoff.max = Duration::from_secs(1);
    let cancel = crate::process::shutdown_token();
    match args.role {
        Role::ChaosConsumePg => {
            let b = postgres::connect(&args.b)
                .await
                .context("connecting to service B's database")?;
            let client = custody::nats::connect(&args.nats).await?;
            let spec = StreamSpec::new(&args.stream, &args.subject_prefix);
            // one of two instances (`custody chaos` runs two): the active
            // one holds the consumer's lease, the other stands by
            let lease = LeaseConfig {
                ttl: Duration::from_secs(3),
                renew_interval: Duration::from_millis(500),
                ..LeaseConfig::default()
            };
            let topics = ["orders".to_owned()];
            let outbox = PgOutbox::new(b.clone());
            LeasedConsumer::new(PgInbox::new(b), cfg, lease)
                .run(
                    || NatsSubscriber::new(client.clone(), &spec, CONSUMER, &topics),
                    || {
                        ChaosBilling::new(
                            PgBilling {
                                outbox: outbox.clone(),
                            },
                            args.flaky,
                            seed,
                        )
                    },
                    cancel,
                )
                .await?;
        }
        _ => {
            let (b, sub) = crate::embedded::consumer_side(args, CONSUMER).await?;
            let handler = ChaosBilling::new(
                SqliteBilling {
                    outbox: SqliteOutbox::new(b.clone()),
                },
                args.flaky,
                seed,
            );
            Consumer::new(SqliteInbox::new(b), sub, handler, cfg)
                .run(cancel)
                .await?;
        }
    }
    Ok(())
}
