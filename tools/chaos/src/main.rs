//! `custody-chaos` (also reachable as `custody chaos` when installed beside
//! `custody`): the producer, the relay(s) and the consumer as separate
//! processes of this binary under a steady load, with faults injected at
//! random times from a printed seed: `kill -9` of any of them, a restart of
//! the NATS server, network cuts between relay and broker and between
//! consumer and database (a TCP fault proxy), a slow consumer, a consumer
//! that fails transiently, and bad input (malformed, oversized, wrong content
//! type, unknown type; in PostgreSQL mode also NUL and control bytes
//! published straight onto the subject). At the end both databases are compared (the demo's
//! report) and the run fails if anything was lost, applied twice, reordered,
//! a bad input was not dead-lettered, a good one was, or a process panicked.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser};
use custody::nats::StreamSpec;
use custody::{postgres, sqlite};
use custody_scenario::chaos::BAD_HEADER;
use custody_scenario::report::{Observed, Report};
use custody_scenario::services::{run_tag, seed_or_now, Databases};
use custody_scenario::{embedded, pg_nats, Internal, Worker};
use custody_testkit::{FaultProxy, NatsServer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::{PgPool, Row, SqlitePool};
use uuid::Uuid;

// the allocator the processes ran with inside the `custody` binary
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Run producer, relays and consumer as processes under load, inject faults from a seed, and check nothing broke.
#[derive(Debug, Parser)]
#[command(name = "custody-chaos", version, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    args: ChaosArgs,
    #[command(subcommand)]
    worker: Option<Internal>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    custody_scenario::tool_main(cli.worker, run(cli.args))
}

/// `custody chaos` options.
#[derive(Debug, Clone, Args)]
pub(crate) struct ChaosArgs {
    /// How long to inject faults under load (then the pipeline drains).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s", value_name = "DURATION")]
    pub(crate) duration: Duration,
    /// Seed of the fault schedule and the workload (printed, so a run can be replayed).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Producer transactions per second.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub(crate) rate: u64,
    /// Run on this PostgreSQL server (fresh databases for A and B) with a
    /// private NATS JetStream server; default: embedded SQLite.
    #[arg(long, value_name = "URL")]
    pub(crate) postgres: Option<String>,
    /// Relay processes (PostgreSQL mode; the embedded transport has no relay).
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub(crate) relays: usize,
    /// Customers (ordering keys).
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub(crate) customers: u64,
    /// Share of handler attempts that fail transiently.
    #[arg(long, default_value_t = 0.3, value_name = "SHARE")]
    pub(crate) flaky: f64,
    /// Give up waiting for the pipeline to drain after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "180s", value_name = "DURATION")]
    pub(crate) drain_timeout: Duration,
    /// Keep databases (SQLite) and process logs in this directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum FaultKind {
    KillRelay,
    KillConsumer,
    KillProducer,
    RestartNats,
    CutRelayBroker,
    CutConsumerDb,
    SlowConsumer,
    LockConsumerDb,
}

impl FaultKind {
    fn label(self) -> &'static str {
        match self {
            FaultKind::KillRelay => "kill -9 relay",
            FaultKind::KillConsumer => "kill -9 consumer",
            FaultKind::KillProducer => "kill -9 producer",
            FaultKind::RestartNats => "NATS server killed and restarted",
            FaultKind::CutRelayBroker => "network cut relay ↔ broker",
            FaultKind::CutConsumerDb => "network cut consumer ↔ database",
            FaultKind::SlowConsumer => "slow consumer ↔ database link",
            FaultKind::LockConsumerDb => "consumer database write-locked",
        }
    }
}

struct Fault {
    at: f64,
    kind: FaultKind,
    detail: String,
    /// Seconds from the end of the fault until B had settled everything A
    /// had committed at that moment.
    recovery: Option<f64>,
}

// one value per run: the size difference does not matter
#[allow(clippy::large_enum_variant)]
enum Env {
    Sqlite {
        a: SqlitePool,
        b: SqlitePool,
        b_path: String,
    },
    Pg {
        a: PgPool,
        b: PgPool,
        nats: NatsServer,
        relay_proxy: FaultProxy,
        db_proxy: FaultProxy,
        dbs: Databases,
        /// The stream's subject prefix (raw bad input is published on it).
        prefix: String,
        /// Bad bytes the harness published straight onto the subject (not
        /// through A's outbox), by id, with their kind.
        raw_bad: HashMap<Uuid, String>,
    },
}

/// Bad bytes published straight onto the consumed subject, as anyone who
/// can publish there could (issue 11, scenario 1): custody's own headers
/// for an otherwise good order, with one attribute percent-encoding a
/// character no store keeps. Each must be dead-lettered with its reason;
/// the consumer must keep going.
const RAW_BAD: &[(&str, &str, &str)] = &[
    ("nulkey", "ce-partitionkey", "customer%00x"),
    ("nulstamp", "ce-custodyproducer", "p%00x"),
    ("controltype", "ce-type", "Order%01Placed"),
    ("nultopic", "ce-custodytopic", "or%00ders"),
];

impl Env {
    /// Publish [`RAW_BAD`] onto the subject (PostgreSQL + NATS mode only);
    /// only messages the broker acknowledged are recorded.
    async fn publish_raw_bad(&mut self) -> anyhow::Result<()> {
        let Env::Pg {
            nats,
            prefix,
            raw_bad,
            ..
        } = self
        else {
            return Ok(());
        };
        let client = custody::nats::connect(&nats.url).await?;
        let js = async_nats::jetstream::new(client);
        for (kind, header, value) in RAW_BAD {
            let order_id = Uuid::now_v7();
            let msg = custody::Message::builder("orders", format!("raw-{kind}"), "OrderPlaced")
                .json(&serde_json::json!({
                    "order_id": order_id, "customer": format!("raw-{kind}"), "amount_cents": 1, "seq": 1
                }))?
                .header(BAD_HEADER, *kind)?
                .build()?;
            let mut h = async_nats::HeaderMap::new();
            for (name, values) in custody::nats::encode_headers(&msg).iter() {
                if name.to_string().eq_ignore_ascii_case("nats-msg-id") {
                    continue;
                }
                for v in values {
                    h.append(name.clone(), v.clone());
                }
            }
            h.insert(*header, *value);
            let subject = format!("{prefix}.orders");
            let acked = async {
                js.publish_with_headers(subject, h, msg.payload.clone().into())
                    .await?
                    .await
                    .map_err(anyhow::Error::from)
            };
            match acked.await {
                Ok(_) => {
                    raw_bad.insert(msg.id, (*kind).to_owned());
                }
                Err(e) => eprintln!("raw bad input {kind} not published ({e}); left out"),
            }
        }
        Ok(())
    }

    fn raw_bad(&self) -> HashMap<Uuid, String> {
        match self {
            Env::Pg { raw_bad, .. } => raw_bad.clone(),
            Env::Sqlite { .. } => HashMap::new(),
        }
    }

    async fn count(&self, sql_a: &str, sql_b: &str) -> anyhow::Result<(i64, i64)> {
        Ok(match self {
            Env::Sqlite { a, b, .. } => (
                sqlx::query_scalar(sql_a).fetch_one(a).await?,
                sqlx::query_scalar(sql_b).fetch_one(b).await?,
            ),
            Env::Pg { a, b, .. } => (
                sqlx::query_scalar(sql_a).fetch_one(a).await?,
                sqlx::query_scalar(sql_b).fetch_one(b).await?,
            ),
        })
    }

    /// (messages A committed, messages settled: processed or dead-lettered by B, or dead-lettered by A's relay).
    async fn progress(&self) -> anyhow::Result<(i64, i64)> {
        let (committed, inbox) = self
            .count(
                "SELECT COUNT(*) FROM custody_outbox WHERE topic = 'orders'",
                "SELECT COUNT(*) FROM custody_inbox WHERE consumer = 'billing'",
            )
            .await?;
        let (relay_dead, _) = self
            .count(
                "SELECT COUNT(*) FROM custody_dead_letter WHERE topic = 'orders'",
                "SELECT CAST(0 AS BIGINT)",
            )
            .await?;
        // raw bad input has inbox rows (its dead letters) but no outbox row
        let raw = match self {
            Env::Pg { raw_bad, .. } => i64::try_from(raw_bad.len())?,
            Env::Sqlite { .. } => 0,
        };
        Ok((committed, inbox + relay_dead - raw))
    }

    async fn observe(&self) -> anyhow::Result<Observed> {
        let mut obs = match self {
            Env::Sqlite { a, b, .. } => embedded::observe(a, b).await?,
            Env::Pg { a, b, .. } => pg_nats::observe(a, b).await?,
        };
        // the relay dead-letters in A's database (e.g. a payload the broker refuses)
        let relay_dead = match self {
            Env::Sqlite { a, .. } => sqlite::dead_letters(a).await?,
            Env::Pg { a, .. } => postgres::dead_letters(a).await?,
        };
        for d in relay_dead.into_iter().filter(|d| d.topic == "orders") {
            obs.b_dead
                .push((d.message_id, format!("(relay) {}", d.error)));
        }
        Ok(obs)
    }

    /// Ids of the producer's deliberately bad messages, with their kind.
    async fn bad_inputs(&self) -> anyhow::Result<HashMap<Uuid, String>> {
        let mut rows: Vec<(Uuid, String)> = Vec::new();
        match self {
            Env::Sqlite { a, .. } => {
                for r in
                    sqlx::query("SELECT id, headers FROM custody_outbox WHERE topic = 'orders'")
                        .fetch_all(a)
                        .await?
                {
                    let id: String = r.try_get(0)?;
                    rows.push((Uuid::parse_str(&id)?, r.try_get(1)?));
                }
            }
            Env::Pg { a, .. } => {
                for r in
                    sqlx::query("SELECT id, headers FROM custody_outbox WHERE topic = 'orders'")
                        .fetch_all(a)
                        .await?
                {
                    rows.push((r.try_get(0)?, r.try_get(1)?));
                }
            }
        }
        let mut bad = HashMap::new();
        for (id, headers) in rows {
            let h: BTreeMap<String, String> = serde_json::from_str(&headers)
                .with_context(|| format!("headers of outbox message {id}"))?;
            if let Some(kind) = h.get(BAD_HEADER) {
                bad.insert(id, kind.clone());
            }
        }
        Ok(bad)
    }

    async fn close(self) {
        match self {
            Env::Sqlite { a, b, .. } => {
                a.close().await;
                b.close().await;
            }
            Env::Pg {
                a,
                b,
                dbs,
                mut nats,
                ..
            } => {
                a.close().await;
                b.close().await;
                nats.stop();
                dbs.drop_all().await;
            }
        }
    }
}

/// A worker process the harness watches: killed only by a fault, restarted
/// when it exits on its own with an error (e.g. it could not connect during
/// an outage), and a panic is a failure.
struct Proc {
    name: String,
    worker: Worker,
    down: bool,
    log: PathBuf,
}

struct Harness {
    env: Env,
    producer: Proc,
    /// Instances of the one billing consumer: two with PostgreSQL (one
    /// active, one standing by, sharing the consumer's lease), one with
    /// SQLite.
    consumers: Vec<Proc>,
    relays: Vec<Proc>,
    started: Instant,
    faults: Vec<Fault>,
    /// (fault index, end of the fault, committed count at its end)
    pending_recovery: Vec<(usize, Instant, i64)>,
    notes: Vec<String>,
    panics: Vec<String>,
    last_progress: (i64, i64),
}

impl Harness {
    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The process a kill fault of `kind` hits (`which`: which relay or
    /// consumer instance).
    fn proc_mut(&mut self, kind: FaultKind, which: usize) -> &mut Proc {
        match kind {
            FaultKind::KillRelay => &mut self.relays[which],
            FaultKind::KillConsumer => &mut self.consumers[which],
            _ => &mut self.producer,
        }
    }

    fn procs_mut(&mut self) -> impl Iterator<Item = &mut Proc> {
        std::iter::once(&mut self.producer)
            .chain(self.consumers.iter_mut())
            .chain(self.relays.iter_mut())
    }

    fn supervise(&mut self) -> anyhow::Result<()> {
        let t = self.elapsed();
        let mut notes = Vec::new();
        let mut panics = Vec::new();
        for p in self.procs_mut() {
            if p.down {
                continue;
            }
            if let Some(status) = p.worker.try_exit()? {
                if status.code() == Some(101) {
                    panics.push(format!(
                        "{} panicked ({status}); log {}",
                        p.name,
                        p.log.display()
                    ));
                } else {
                    notes.push(format!(
                        "+{t:>6.1}s  {} exited on its own ({status}); restarted (see {})",
                        p.name,
                        p.log.display()
                    ));
                }
                p.worker.restart()?;
            }
        }
        self.notes.extend(notes);
        self.panics.extend(panics);
        Ok(())
    }

    async fn poll(&mut self) {
        let Ok(progress) = self.env.progress().await else {
            return;
        };
        self.last_progress = progress;
        let now = Instant::now();
        let settled = progress.1;
        let faults = &mut self.faults;
        self.pending_recovery.retain(|(i, end, target)| {
            if settled >= *target {
                faults[*i].recovery = Some(now.duration_since(*end).as_secs_f64());
                false
            } else {
                true
            }
        });
    }

    async fn tick(&mut self) -> anyhow::Result<()> {
        self.supervise()?;
        self.poll().await;
        Ok(())
    }

    /// Wait `d`, watching processes and progress.
    async fn wait(&mut self, d: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + d;
        loop {
            self.tick().await?;
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            tokio::time::sleep((end - now).min(Duration::from_millis(200))).await;
        }
    }

    fn begin_fault(&mut self, kind: FaultKind, detail: String) -> usize {
        let at = self.elapsed();
        eprintln!("fault +{at:>6.1}s  {}: {detail}", kind.label());
        self.faults.push(Fault {
            at,
            kind,
            detail,
            recovery: None,
        });
        self.faults.len() - 1
    }

    async fn end_fault(&mut self, i: usize) {
        self.poll().await;
        let committed = self.last_progress.0;
        self.pending_recovery.push((i, Instant::now(), committed));
    }

    async fn inject(&mut self, kind: FaultKind, rng: &mut StdRng) -> anyhow::Result<()> {
        let down = Duration::from_millis(rng.gen_range(300..3000));
        match kind {
            FaultKind::KillRelay | FaultKind::KillConsumer | FaultKind::KillProducer => {
                let relay = match kind {
                    FaultKind::KillRelay => rng.gen_range(0..self.relays.len().max(1)),
                    FaultKind::KillConsumer => rng.gen_range(0..self.consumers.len().max(1)),
                    _ => 0,
                };
                let name = self.proc_mut(kind, relay).name.clone();
                let i = self.begin_fault(
                    kind,
                    format!("{name} SIGKILLed, restarted after {down:.1?}"),
                );
                let p = self.proc_mut(kind, relay);
                p.down = true;
                p.worker.kill9().await?;
                self.wait(down).await?;
                let p = self.proc_mut(kind, relay);
                p.worker.restart()?;
                p.down = false;
                self.end_fault(i).await;
            }
            FaultKind::RestartNats => {
                let i = self.begin_fault(
                    kind,
                    format!("SIGKILL, down for {down:.1?}, restarted on the same store"),
                );
                if let Env::Pg { nats, .. } = &mut self.env {
                    nats.stop();
                }
                self.wait(down).await?;
                if let Env::Pg { nats, .. } = &mut self.env {
                    nats.restart().await?;
                }
                self.end_fault(i).await;
            }
            FaultKind::CutRelayBroker | FaultKind::CutConsumerDb => {
                let i = self.begin_fault(kind, format!("cut for {down:.1?}, then restored"));
                if let Env::Pg {
                    relay_proxy,
                    db_proxy,
                    ..
                } = &self.env
                {
                    if kind == FaultKind::CutRelayBroker {
                        relay_proxy.cut()
                    } else {
                        db_proxy.cut()
                    }
                }
                self.wait(down).await?;
                if let Env::Pg {
                    relay_proxy,
                    db_proxy,
                    ..
                } = &self.env
                {
                    relay_proxy.restore();
                    db_proxy.restore();
                }
                self.end_fault(i).await;
            }
            FaultKind::SlowConsumer => {
                let delay = Duration::from_millis(rng.gen_range(5..40));
                let long = down * 2;
                let i = self.begin_fault(
                    kind,
                    format!("every packet delayed {delay:?} for {long:.1?} (back-pressure)"),
                );
                if let Env::Pg { db_proxy, .. } = &self.env {
                    db_proxy.slow(delay);
                }
                self.wait(long).await?;
                if let Env::Pg { db_proxy, .. } = &self.env {
                    db_proxy.restore();
                }
                self.end_fault(i).await;
            }
            FaultKind::LockConsumerDb => {
                let i = self.begin_fault(
                    kind,
                    format!("held for {down:.1?} (consumer retries with backoff)"),
                );
                if let Env::Sqlite { b_path, .. } = &self.env {
                    let lock = tokio::spawn(embedded::lock_database(b_path.clone(), down));
                    self.wait(down).await?;
                    lock.await??;
                }
                self.end_fault(i).await;
            }
        }
        Ok(())
    }
}

fn scan_panics(logs: &[PathBuf]) -> Vec<String> {
    let mut out = Vec::new();
    for l in logs {
        if let Ok(text) = std::fs::read_to_string(l) {
            for line in text.lines().filter(|x| x.contains("panicked at")) {
                out.push(format!("{}: {line}", l.display()));
            }
        }
    }
    out
}

/// Run `custody-chaos`.
pub(crate) async fn run(args: ChaosArgs) -> anyhow::Result<ExitCode> {
    let seed = seed_or_now(args.seed);
    if args.rate == 0 {
        anyhow::bail!("--rate must be at least 1 transaction per second");
    }
    let tag = run_tag();
    let (dir, remove_dir) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("custody-chaos-{tag}")),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = run_in(&args, seed, &tag, &dir).await;
    if remove_dir && matches!(result, Ok(ref c) if *c == ExitCode::SUCCESS) {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("process logs kept in {}", dir.display());
    }
    result
}

async fn run_in(
    args: &ChaosArgs,
    seed: u64,
    tag: &str,
    dir: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let rolled_back_log = dir.join("rolled_back.txt");
    let _ = std::fs::remove_file(&rolled_back_log);
    let common = |role: &str| {
        vec![
            "--role".to_owned(),
            role.to_owned(),
            "--rate".to_owned(),
            args.rate.to_string(),
            "--customers".to_owned(),
            args.customers.to_string(),
            "--flaky".to_owned(),
            args.flaky.to_string(),
            "--rolled-back-log".to_owned(),
            rolled_back_log.to_string_lossy().into_owned(),
        ]
    };
    let (env, mode, producer_args, consumer_args, relay_args) = match &args.postgres {
        None => {
            let a_path = embedded::fresh_db(dir, "orders.db")?;
            let b_path = embedded::fresh_db(dir, "billing.db")?;
            let (a, b) = embedded::setup(&a_path, &b_path).await?;
            let ab = |mut v: Vec<String>| {
                v.extend(["--a".into(), a_path.clone(), "--b".into(), b_path.clone()]);
                v
            };
            let p = ab(common("produce-sqlite"));
            let c = ab(common("chaos-consume-embedded"));
            (
                Env::Sqlite {
                    a,
                    b,
                    b_path: b_path.clone(),
                },
                "embedded SQLite (consumer reads A's outbox as the log); producer and consumer as processes".to_owned(),
                p,
                c,
                Vec::new(),
            )
        }
        Some(pg) => {
            let dbs = Databases::create(
                pg,
                &[
                    format!("custody_chaos_a_{tag}"),
                    format!("custody_chaos_b_{tag}"),
                ],
            )
            .await?;
            let [a_url, b_url]: [String; 2] = dbs
                .urls()
                .try_into()
                .map_err(|_| anyhow::anyhow!("two databases"))?;
            let stream = format!("CUSTODY_CHAOS_{tag}");
            let prefix = format!("custody_chaos_{tag}");
            // drop the databases again if the rest of the setup fails
            let setup = async {
                let (a, b) = pg_nats::setup(&a_url, &b_url).await?;
                let Some(nats) = NatsServer::start().await? else {
                    anyhow::bail!("custody chaos --postgres needs a nats-server binary (it starts its own JetStream server)");
                };
                let client = custody::nats::connect(&nats.url).await?;
                custody::nats::ensure_stream(&client, &StreamSpec::new(&stream, &prefix)).await?;
                drop(client);
                let relay_proxy = FaultProxy::for_url(&nats.url).await?;
                let db_proxy = FaultProxy::for_url(&b_url).await?;
                anyhow::Ok((a, b, nats, relay_proxy, db_proxy))
            };
            let (a, b, nats, (relay_proxy, relay_nats), (db_proxy, consumer_b)) = match setup.await
            {
                Ok(v) => v,
                Err(e) => {
                    dbs.drop_all().await;
                    return Err(e);
                }
            };
            let with = |mut v: Vec<String>, b: &str, n: &str| {
                v.extend([
                    "--a".into(),
                    a_url.clone(),
                    "--b".into(),
                    b.to_owned(),
                    "--nats".into(),
                    n.to_owned(),
                    "--stream".into(),
                    stream.clone(),
                    "--subject-prefix".into(),
                    prefix.clone(),
                ]);
                v
            };
            let p = with(common("produce-pg"), &b_url, &nats.url);
            let c = with(common("chaos-consume-pg"), &consumer_b, &nats.url);
            let relays = (0..args.relays.max(1))
                .map(|i| {
                    let mut v = with(common("relay-pg"), &b_url, &relay_nats);
                    v.extend(["--id".into(), format!("chaos-relay-{i}")]);
                    v
                })
                .collect();
            (
                Env::Pg {
                    a,
                    b,
                    nats,
                    relay_proxy,
                    db_proxy,
                    dbs,
                    prefix: prefix.clone(),
                    raw_bad: HashMap::new(),
                },
                format!(
                    "PostgreSQL + NATS JetStream (private server), {} relay process(es), relay↔broker and consumer↔database through fault proxies",
                    args.relays.max(1)
                ),
                p,
                c,
                relays,
            )
        }
    };
    eprintln!(
        "custody chaos — {mode}; {:?} of faults at {} tx/s over {} customers, flaky {:.0}%, seed {seed} (replay with --seed {seed})",
        args.duration,
        args.rate,
        args.customers,
        args.flaky * 100.0
    );
    let spawn = |name: &str, mut a: Vec<String>, seed: u64| -> anyhow::Result<Proc> {
        a.extend(["--seed".into(), seed.to_string()]);
        let log = dir.join(format!("{name}.log"));
        Ok(Proc {
            name: name.to_owned(),
            worker: Worker::spawn_logged(a, log.clone())?,
            down: false,
            log,
        })
    };
    // with PostgreSQL a second instance of the consumer stands by (the
    // consumer lease); kills hit either, so takeovers happen under load
    let instances = if matches!(env, Env::Pg { .. }) { 2 } else { 1 };
    let consumers = (0..instances)
        .map(|i| spawn(&format!("consumer-{i}"), consumer_args.clone(), seed))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let relays = relay_args
        .into_iter()
        .enumerate()
        .map(|(i, a)| spawn(&format!("relay-{i}"), a, seed))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let producer = spawn("producer", producer_args, seed)?;
    let mut logs: Vec<PathBuf> = vec![producer.log.clone()];
    logs.extend(consumers.iter().map(|c| c.log.clone()));
    logs.extend(relays.iter().map(|r| r.log.clone()));
    let mut h = Harness {
        env,
        producer,
        consumers,
        relays,
        started: Instant::now(),
        faults: Vec::new(),
        pending_recovery: Vec::new(),
        notes: Vec::new(),
        panics: Vec::new(),
        last_progress: (0, 0),
    };
    let result = drive(args, seed, &mut h, &mode, &rolled_back_log, &logs).await;
    for p in h.procs_mut() {
        let _ = p.worker.kill9().await;
    }
    h.env.close().await;
    result
}

async fn drive(
    args: &ChaosArgs,
    seed: u64,
    h: &mut Harness,
    mode: &str,
    rolled_back_log: &std::path::Path,
    logs: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    let kinds: Vec<FaultKind> = match h.env {
        Env::Sqlite { .. } => vec![
            FaultKind::KillConsumer,
            FaultKind::KillProducer,
            FaultKind::LockConsumerDb,
        ],
        Env::Pg { .. } => vec![
            FaultKind::KillRelay,
            FaultKind::KillConsumer,
            FaultKind::KillProducer,
            FaultKind::RestartNats,
            FaultKind::CutRelayBroker,
            FaultKind::CutConsumerDb,
            FaultKind::SlowConsumer,
        ],
    };
    let mut rng = StdRng::seed_from_u64(seed);
    // the first faults come quickly, so even a short run sees every kind
    let mut order: Vec<FaultKind> = kinds.clone();
    order.reverse();
    let deadline = h.started + args.duration;
    h.wait(Duration::from_secs(2)).await?;
    h.env.publish_raw_bad().await?;
    while Instant::now() < deadline {
        let kind = order
            .pop()
            .unwrap_or_else(|| kinds[rng.gen_range(0..kinds.len())]);
        h.inject(kind, &mut rng).await?;
        // short gaps until every kind has had its turn
        let gap = if order.is_empty() {
            Duration::from_millis(rng.gen_range(500..2500))
        } else {
            Duration::from_millis(rng.gen_range(200..800))
        };
        let left = deadline.saturating_duration_since(Instant::now());
        h.wait(gap.min(left)).await?;
    }
    // stop producing (a last crash), then let everything drain
    h.producer.down = true;
    h.producer.worker.kill9().await?;
    let load_secs = h.started.elapsed().as_secs_f64();
    eprintln!(
        "load stopped after {load_secs:.1}s; waiting for the backlog to drain ({} committed, {} settled)",
        h.last_progress.0, h.last_progress.1
    );
    let drain_started = Instant::now();
    let drain_deadline = drain_started + args.drain_timeout;
    let drained = loop {
        h.tick().await?;
        let (committed, settled) = h.last_progress;
        if committed > 0 && settled >= committed {
            break true;
        }
        if Instant::now() > drain_deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let drain_secs = drain_started.elapsed().as_secs_f64();
    let elapsed = h.started.elapsed();
    for p in h.procs_mut() {
        p.down = true;
        p.worker.kill9().await?;
    }

    let mut obs = h.env.observe().await?;
    // raw bad input is checked with the producer's bad input below; the
    // report compares what A committed with what B did, so it leaves it out
    let raw_bad = h.env.raw_bad();
    let raw_dead = obs.b_dead.clone();
    obs.b_dead
        .retain(|(id, _)| id.is_none_or(|id| !raw_bad.contains_key(&id)));
    obs.b_inbox.retain(|(id, _)| !raw_bad.contains_key(id));
    let rolled_back: Vec<Uuid> = std::fs::read_to_string(rolled_back_log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| Uuid::parse_str(l.trim()).ok())
        .collect();
    let mut bad = h.env.bad_inputs().await?;
    bad.extend(raw_bad);
    let fault_lines: Vec<String> = h
        .faults
        .iter()
        .map(|f| {
            let rec = match f.recovery {
                Some(r) => format!("backlog drained {r:.1}s after"),
                None => "backlog not drained".to_owned(),
            };
            format!("+{:>6.1}s  {}: {} — {rec}", f.at, f.kind.label(), f.detail)
        })
        .collect();
    let report = Report::compute(
        mode.to_owned(),
        seed,
        fault_lines,
        &rolled_back,
        &obs,
        elapsed,
    );

    // bad input: each one dead-lettered with a reason; no good message dead-lettered
    let dead: HashMap<Uuid, &str> = raw_dead
        .iter()
        .filter_map(|(id, r)| id.map(|id| (id, r.as_str())))
        .collect();
    let bad_not_dead: Vec<(Uuid, &str)> = bad
        .iter()
        .filter(|(id, _)| dead.get(id).is_none_or(|r| r.trim().is_empty()))
        .map(|(id, k)| (*id, k.as_str()))
        .collect();
    let good_dead: Vec<(Uuid, &str)> = dead
        .iter()
        .filter(|(id, _)| !bad.contains_key(id))
        .map(|(id, r)| (*id, *r))
        .collect();
    let mut bad_kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for k in bad.values() {
        *bad_kinds.entry(k.as_str()).or_insert(0) += 1;
    }
    let mut panics = h.panics.clone();
    panics.extend(scan_panics(logs));
    let ok = report.ok()
        && drained
        && bad_not_dead.is_empty()
        && good_dead.is_empty()
        && panics.is_empty();

    print!("{}", report.render_without_verdict("custody chaos"));
    println!("chaos:");
    let mut by_kind: BTreeMap<FaultKind, usize> = BTreeMap::new();
    for f in &h.faults {
        *by_kind.entry(f.kind).or_insert(0) += 1;
    }
    println!(
        "  faults injected                              {:>10}",
        h.faults.len()
    );
    for (k, n) in &by_kind {
        println!("      {:<40} {n:>6}", k.label());
    }
    let mut rec: Vec<f64> = h.faults.iter().filter_map(|f| f.recovery).collect();
    rec.sort_by(f64::total_cmp);
    if !rec.is_empty() {
        println!(
            "  recovery after a fault (backlog drained)     median {:.1}s, p90 {:.1}s, max {:.1}s",
            rec[rec.len() / 2],
            rec[(rec.len() * 9 / 10).min(rec.len() - 1)],
            rec[rec.len() - 1]
        );
    }
    println!(
        "  final drain after the load stopped          {drain_secs:>9.1}s{}",
        if drained { "" } else { "  (NOT drained)" }
    );
    println!(
        "  bad inputs (by A, or raw on the wire)       {:>10}",
        bad.len()
    );
    for (k, n) in &bad_kinds {
        println!("      {k:<40} {n:>6}");
    }
    println!(
        "  bad inputs not dead-lettered                {:>10}",
        bad_not_dead.len()
    );
    for (id, k) in bad_not_dead.iter().take(10) {
        println!("      {id}  {k}");
    }
    println!(
        "  good messages dead-lettered                 {:>10}",
        good_dead.len()
    );
    for (id, r) in good_dead.iter().take(10) {
        println!("      {id}  {r}");
    }
    println!(
        "  processes that panicked                     {:>10}",
        panics.len()
    );
    for p in &panics {
        println!("      {p}");
    }
    for n in &h.notes {
        println!("  note {n}");
    }
    if ok {
        println!("CHAOS RESULT: OK — seed {seed}: nothing lost, nothing applied twice, order kept, bad input contained, no panic");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("CHAOS RESULT: FAILED — seed {seed}; replay with `custody chaos --seed {seed}` (same options)");
        Ok(ExitCode::from(2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_are_found_in_logs() {
        let dir = std::env::temp_dir().join(format!("custody-chaos-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let log = dir.join("w.log");
        std::fs::write(&log, "ok\nthread 'main' panicked at src/x.rs:1:1:\nboom\n").expect("write");
        assert_eq!(scan_panics(&[log]).len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
