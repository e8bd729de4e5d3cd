//! `custody consume`: custody's consumer with a handler given on the
//! command line (docs/OPERATIONS.md, "custody consume and custody produce").

use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args};
use custody::declarative::HandlerSpec;
use custody::{ConsumeLimits, ConsumerStats};

use crate::config::Config;
use crate::ops::{config_text, redact, serve_metrics, shutdown_token};

/// `custody consume`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["nats", "outbox"])))]
pub struct ConsumeArgs {
    /// The consumer's own database (inbox, dead letters, `record:` tables):
    /// `postgres://…` or a SQLite file (`sqlite://path` or a path). Created
    /// (SQLite) and migrated on start.
    #[arg(long, env = "CUSTODY_DB", hide_env_values = true, value_name = "URL")]
    pub db: String,
    /// The consumer's name in its inbox and dead letters (and the JetStream
    /// durable or embedded subscription it reads with); `custody reconcile`
    /// and `custody dlq --consumer` take the same name.
    #[arg(long)]
    pub consumer_name: String,
    /// Topic to consume; repeat for several. None: every topic.
    #[arg(long = "topic")]
    pub topics: Vec<String>,
    /// Read from NATS JetStream at this URL (`--nats` alone: nats://127.0.0.1:4222).
    #[arg(long, num_args = 0..=1, default_missing_value = "nats://127.0.0.1:4222")]
    pub nats: Option<String>,
    /// With --nats: JetStream stream name (created if missing), as given to
    /// `custody relay` [default: CUSTODY].
    #[arg(long)]
    pub stream: Option<String>,
    /// With --nats: subject prefix, as given to `custody relay`: topic `orders`
    /// is `<prefix>.orders` [default: custody].
    #[arg(long)]
    pub subject_prefix: Option<String>,
    /// Read the producer's outbox directly (embedded transport, no broker):
    /// its database, `postgres://…` or a SQLite file.
    #[arg(long)]
    pub outbox: Option<String>,
    /// What to do with each message: `print` (a JSON line on stdout),
    /// `record:<table>` (insert into that table of --db, exactly once) or
    /// `http:<url>` (POST it, CloudEvents binary mode, `Idempotency-Key`).
    #[arg(long, value_parser = parse_handler)]
    pub handler: HandlerSpec,
    /// Stop after this many messages were settled (processed, skipped as
    /// duplicates or dead-lettered), exit 0.
    #[arg(long)]
    pub max_messages: Option<u64>,
    /// Stop once no message came for this long (e.g. `5s`), exit 0.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub until_idle: Option<Duration>,
    /// Serve Prometheus metrics (`custody_consumer_*`) on this address.
    #[arg(long, env = "CUSTODY_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

fn parse_handler(s: &str) -> Result<HandlerSpec, String> {
    s.parse().map_err(|e| config_text(&e))
}

pub async fn run(args: ConsumeArgs, cfg: Config) -> anyhow::Result<ExitCode> {
    if args.consumer_name.trim().is_empty() {
        anyhow::bail!("--consumer-name is empty; give the consumer a name");
    }
    if args.max_messages == Some(0) {
        anyhow::bail!("--max-messages 0 would stop before consuming anything; give at least 1");
    }
    if args.nats.is_none() && (args.stream.is_some() || args.subject_prefix.is_some()) {
        anyhow::bail!(
            "--stream and --subject-prefix name where to read on NATS; they need --nats (with --outbox there is no stream)"
        );
    }
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr)?;
    }
    let mut config = cfg.consumer.clone();
    config.name = args.consumer_name.clone();
    let limits = ConsumeLimits {
        max_messages: args.max_messages,
        until_idle: args.until_idle,
    };
    let cancel = shutdown_token();
    let db_error = |e: custody::Error| {
        anyhow::anyhow!(
            "consumer database {}: {}",
            redact(&args.db),
            config_text(&e)
        )
    };
    let stats = match (&args.nats, &args.outbox) {
        (Some(url), _) => {
            let client = crate::ops::connect_nats(url, &cfg).await?;
            let spec = custody::nats::StreamSpec::new(
                args.stream.as_deref().unwrap_or(crate::ops::DEFAULT_STREAM),
                args.subject_prefix
                    .as_deref()
                    .unwrap_or(crate::ops::DEFAULT_SUBJECT_PREFIX),
            );
            custody::nats::ensure_stream(&client, &spec).await?;
            let sub = custody::nats::NatsSubscriber::new(
                client,
                &spec,
                &args.consumer_name,
                &args.topics,
            )
            .await?;
            custody::run_consumer(&args.db, sub, &args.handler, config, limits, cancel)
                .await
                .map_err(db_error)?
        }
        (None, Some(outbox)) => {
            let sub = custody::open_embedded(outbox, &args.consumer_name, &args.topics)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("producer database {}: {}", redact(outbox), config_text(&e))
                })?;
            custody::run_consumer(&args.db, sub, &args.handler, config, limits, cancel)
                .await
                .map_err(db_error)?
        }
        (None, None) => anyhow::bail!("give a source: --nats URL or --outbox DATABASE"),
    };
    eprintln!("{}", summary(&stats));
    Ok(ExitCode::SUCCESS)
}

/// The counters printed at exit (stderr: stdout is the `print` handler's).
fn summary(s: &ConsumerStats) -> String {
    format!(
        "consume stopped: processed {}, duplicates skipped {}, dead-lettered {}, retries {}, redriven {}",
        s.processed, s.duplicates, s.dead_lettered, s.retries, s.redriven
    )
}
