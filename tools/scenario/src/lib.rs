//! The scenario the development tools share (`custody-demo`, `custody-chaos`,
//! `custody-bench`; none of them ships in the `custody` binary): an order
//! service A and a billing service B with separate databases — their schemas,
//! the producer, the billing handler, the report that compares A's and B's
//! databases — and the worker processes (roles) a tool starts and kills.
//!
//! Each tool re-executes itself as `<tool> worker --role …` (hidden) and
//! hands the arguments to [`run_worker`], so demo and chaos share every role
//! without importing each other.
#![forbid(unsafe_code)]

pub mod billing;
pub mod chaos;
pub mod embedded;
pub mod pg_nats;
pub mod process;
pub mod producer;
pub mod report;
pub mod services;

use std::future::Future;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use custody::Message;
use indicatif::{ProgressBar, ProgressStyle};
use uuid::Uuid;

/// Role of a demo worker process.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Role {
    /// Billing consumer reading A's SQLite outbox directly (embedded transport).
    ConsumeEmbedded,
    /// Relay from A's PostgreSQL outbox to NATS.
    RelayPg,
    /// Billing consumer on NATS into B's PostgreSQL.
    ConsumePg,
    /// `custody chaos`: the producer (service A) on SQLite, committing at `--rate`.
    ProduceSqlite,
    /// `custody chaos`: the producer on PostgreSQL.
    ProducePg,
    /// `custody chaos`: billing on the embedded transport, failing transiently (`--flaky`).
    ChaosConsumeEmbedded,
    /// `custody chaos`: billing on NATS into PostgreSQL, failing transiently (`--flaky`).
    ChaosConsumePg,
}

/// `<tool> worker` options (internal).
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// What this process does.
    #[arg(long, value_enum)]
    pub role: Role,
    /// Service A's database.
    #[arg(long)]
    pub a: String,
    /// Service B's database.
    #[arg(long)]
    pub b: String,
    /// NATS URL.
    #[arg(long, default_value = "")]
    pub nats: String,
    /// JetStream stream.
    #[arg(long, default_value = "")]
    pub stream: String,
    /// Subject prefix: a message of topic `orders` goes to `<prefix>.orders`
    /// (the same flag as `custody relay --subject-prefix`).
    #[arg(long, default_value = "")]
    pub subject_prefix: String,
    /// Relay id (its name in the lease table).
    #[arg(long, default_value = "demo-relay")]
    pub id: String,
    /// Producer: seed of its workload.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Producer: transactions per second.
    #[arg(long, default_value_t = 50)]
    pub rate: u64,
    /// Producer: customers (ordering keys).
    #[arg(long, default_value_t = 20)]
    pub customers: u64,
    /// Producer: file the ids of rolled-back orders are appended to.
    #[arg(long)]
    pub rolled_back_log: Option<std::path::PathBuf>,
    /// Consumer: probability that a handler attempt fails transiently.
    #[arg(long, default_value_t = 0.0)]
    pub flaky: f64,
}

/// The hidden subcommand of a tool that starts worker processes:
/// `<tool> worker --role …` (see [`Worker::spawn`]).
#[derive(Debug, Subcommand)]
pub enum Internal {
    /// Internal: a process of the run (producer, relay or consumer), started and killed by the tool itself.
    #[command(hide = true)]
    Worker(WorkerArgs),
}

/// A tool's `main`: the worker process if `internal` says so, else the
/// tool's own run (see [`process::main_with`]).
pub fn tool_main<F>(internal: Option<Internal>, run: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<ExitCode>>,
{
    process::main_with(async move {
        match internal {
            Some(Internal::Worker(args)) => {
                run_worker(args).await?;
                Ok(ExitCode::SUCCESS)
            }
            None => run.await,
        }
    })
}

/// Run one worker process (any role) until SIGTERM / SIGKILL.
pub async fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    match args.role {
        Role::ConsumeEmbedded => embedded::consume(&args).await,
        Role::RelayPg => pg_nats::relay(&args).await,
        Role::ConsumePg => pg_nats::consume(&args).await,
        Role::ProduceSqlite | Role::ProducePg => chaos::produce(&args).await,
        Role::ChaosConsumeEmbedded | Role::ChaosConsumePg => chaos::consume(&args).await,
    }
}

/// A child process of the demo that can be killed for real.
pub struct Worker {
    child: tokio::process::Child,
    args: Vec<String>,
    log: Option<std::path::PathBuf>,
}

impl Worker {
    /// Start `<this tool> worker <args>` (the tool re-executes itself).
    pub fn spawn(args: Vec<String>) -> anyhow::Result<Worker> {
        Self::spawn_inner(args, None)
    }

    /// Start `<this tool> worker <args>` with its stderr appended to `log`.
    pub fn spawn_logged(args: Vec<String>, log: std::path::PathBuf) -> anyhow::Result<Worker> {
        Self::spawn_inner(args, Some(log))
    }

    fn spawn_inner(args: Vec<String>, log: Option<std::path::PathBuf>) -> anyhow::Result<Worker> {
        let exe = std::env::current_exe()?;
        let stderr = match &log {
            Some(p) => std::process::Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => std::process::Stdio::inherit(),
        };
        let child = tokio::process::Command::new(exe)
            .arg("worker")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()?;
        Ok(Worker { child, args, log })
    }

    /// The exit status if the worker has exited (on its own or killed).
    pub fn try_exit(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// SIGKILL: no cleanup, no graceful shutdown — a real crash.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// Start the same worker again.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        *self = Worker::spawn_inner(self.args.clone(), self.log.clone())?;
        Ok(())
    }

    /// Fail if the worker died on its own (not killed by us).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("demo worker {:?} exited on its own with {status}; run with CUSTODY_LOG=info to see why", self.args.first());
        }
        Ok(())
    }
}

/// The workload: which customer each order belongs to, which transactions
/// roll back, where the bad messages go. Deterministic for a seed.
pub struct Workload {
    rng: rand::rngs::StdRng,
    customers: u64,
    /// Orders the producer commits.
    pub total: u64,
}

/// One transaction of a producer (the demo's [`Workload`], chaos' producer).
pub enum Step {
    /// An order row and its OrderPlaced event, committed — or rolled back,
    /// and then B must never see it.
    Order {
        /// The customer (message key).
        customer: String,
        /// Roll the transaction back instead of committing it.
        roll_back: bool,
    },
    /// A message committed on its own (a bad one B has to dead-letter).
    Event(Message),
}

impl Workload {
    /// The workload of `total` orders over `customers` keys, for `seed`.
    pub fn new(seed: u64, total: u64, customers: u64) -> Self {
        use rand::SeedableRng;
        Workload {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            customers,
            total,
        }
    }

    /// The `i`-th transaction (0-based).
    pub fn step(&mut self, i: u64) -> anyhow::Result<Step> {
        use rand::Rng;
        let customer = format!("customer-{:03}", self.rng.gen_range(0..self.customers));
        Ok(if i == self.total / 3 {
            // an OrderPlaced whose payload is not JSON
            Step::Event(
                Message::builder("orders", "customer-bad", "OrderPlaced")
                    .payload(custody::CONTENT_TYPE_JSON, b"{\"order_id\": oops".to_vec())
                    .build()?,
            )
        } else if i == self.total / 2 {
            // a message type billing has no handler for
            Step::Event(
                Message::builder("orders", "customer-gift", "OrderGiftWrapped")
                    .json(&serde_json::json!({ "ribbon": "red" }))?
                    .build()?,
            )
        } else {
            let roll_back = self.rng.gen_ratio(1, 40);
            Step::Order {
                customer,
                roll_back,
            }
        })
    }
}

/// The OrderPlaced payload.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderPlaced {
    /// The order (A's `orders` row, B's ledger entry).
    pub order_id: uuid::Uuid,
    /// The customer: the message key.
    pub customer: String,
    /// Derived from the order id.
    pub amount_cents: i64,
    /// 1, 2, 3, ... per customer, in A's commit order.
    pub seq: i64,
}

/// A new order's id and amount (derived from the id).
pub fn new_order() -> (Uuid, i64) {
    let order_id = Uuid::now_v7();
    (order_id, 100 + (order_id.as_u128() % 9_900) as i64)
}

impl OrderPlaced {
    /// The event message: topic `orders`, keyed by the customer.
    pub fn message(&self) -> anyhow::Result<Message> {
        Ok(
            Message::builder("orders", self.customer.clone(), "OrderPlaced")
                .json(self)?
                .build()?,
        )
    }
}

/// Progress and fault log shared by the demo variants.
pub struct Run {
    /// When the run started.
    pub started: Instant,
    /// The faults injected so far, each with its time since the start.
    pub faults: Vec<String>,
    /// Progress on stderr (hidden when stderr is not a terminal).
    pub bar: ProgressBar,
}

impl Run {
    /// A run of `total` orders, starting now.
    pub fn new(total: u64) -> Run {
        let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressBar::new(total)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} processed by B  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Run {
            started: Instant::now(),
            faults: Vec::new(),
            bar,
        }
    }

    /// Record an injected fault (printed at once and kept for the report).
    pub fn fault(&mut self, what: String) {
        let line = format!("+{:>5.1}s  {what}", self.started.elapsed().as_secs_f64());
        self.bar.println(format!("fault {line}"));
        if self.bar.is_hidden() {
            eprintln!("fault {line}");
        }
        self.faults.push(line);
    }

    /// After A has finished: wait until B has settled the `expected`
    /// messages A committed (or `timeout` passed), failing if a worker died
    /// on its own; then kill the workers. Returns the run's elapsed time.
    pub async fn drain<F, Fut>(
        &self,
        workers: &mut [&mut Worker],
        expected: u64,
        timeout: Duration,
        processed: F,
    ) -> anyhow::Result<Duration>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = anyhow::Result<u64>>,
    {
        self.bar.set_message("A finished; waiting for B to drain");
        self.bar.set_length(expected);
        let deadline = Instant::now() + timeout;
        loop {
            let done = processed().await.unwrap_or(0);
            self.bar.set_position(done);
            if done >= expected || Instant::now() > deadline {
                break;
            }
            for w in workers.iter_mut() {
                w.check_alive()?;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let elapsed = self.started.elapsed();
        for w in workers.iter_mut() {
            w.kill9().await?;
        }
        self.bar.finish_and_clear();
        Ok(elapsed)
    }
}
