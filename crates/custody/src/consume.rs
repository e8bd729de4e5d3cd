//! [`run_consumer`]: custody's [`Consumer`] with a [`DeclarativeHandler`]
//! on the consumer database at a URL, whichever backend holds it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use custody_core::{admin, Delivery, Error, InboxStore, Result, Subscriber};
use custody_engine::{CancellationToken, Consumer, ConsumerConfig, ConsumerStats};
use tokio::time::Instant;

use crate::declarative::{DeclarativeHandler, HandlerSpec, RecordSink};
use crate::drivers;

/// When a consumer started by [`run_consumer`] stops by itself (it always
/// stops on its cancellation token).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumeLimits {
    /// Stop once this many deliveries were settled: processed,
    /// recognised as duplicates, or dead-lettered. Deliveries are fetched
    /// no more than needed to reach it.
    pub max_messages: Option<u64>,
    /// Stop once no delivery came for this long.
    pub until_idle: Option<Duration>,
}

/// Consume from `subscriber` into the consumer database at `url` (any
/// backend compiled in; connected and migrated), applying the handler
/// `spec` describes, until `cancel` or a [`ConsumeLimits`] bound. Returns
/// the consumer's counters.
///
/// `print` and `http:` handlers have effects outside the transaction, so
/// they run with `group_commit` off (a group retried one at a time would
/// print or post its first messages again); `record:` creates its table
/// first (an existing table must have its columns).
pub async fn run_consumer<S: Subscriber>(
    url: &str,
    subscriber: S,
    spec: &HandlerSpec,
    mut config: ConsumerConfig,
    limits: ConsumeLimits,
    cancel: CancellationToken,
) -> Result<ConsumerStats> {
    if !spec.effect_in_transaction() {
        config.group_commit = false;
    }
    let driver = admin::driver_for(&drivers(), url)?;
    #[cfg(feature = "postgres")]
    if driver.name == custody_postgres::DRIVER.name {
        let pool = custody_postgres::connect(url).await?;
        custody_postgres::migrate(&pool).await?;
        let handler =
            DeclarativeHandler::new(spec, |t| crate::declarative::PgRecord::new(pool.clone(), t))?;
        let inbox = custody_postgres::PgInbox::new(pool);
        return go(inbox, subscriber, handler, config, limits, cancel).await;
    }
    #[cfg(feature = "sqlite")]
    if driver.name == custody_sqlite::DRIVER.name {
        let pool = custody_sqlite::connect(url).await?;
        custody_sqlite::migrate(&pool).await?;
        let handler = DeclarativeHandler::new(spec, |t| {
            crate::declarative::SqliteRecord::new(pool.clone(), t)
        })?;
        let inbox = custody_sqlite::SqliteInbox::new(pool);
        return go(inbox, subscriber, handler, config, limits, cancel).await;
    }
    let _ = (subscriber, config, limits, cancel);
    Err(Error::Config(format!(
        "backend {} has no consumer in this build",
        driver.name
    )))
}

async fn go<I, S, R>(
    inbox: I,
    subscriber: S,
    handler: DeclarativeHandler<R>,
    config: ConsumerConfig,
    limits: ConsumeLimits,
    cancel: CancellationToken,
) -> Result<ConsumerStats>
where
    I: InboxStore,
    S: Subscriber,
    R: RecordSink<I::Tx>,
{
    if let Some(sink) = handler.sink() {
        sink.prepare().await?;
    }
    if limits.max_messages.is_none() && limits.until_idle.is_none() {
        return Consumer::new(inbox, subscriber, handler, config)
            .run(cancel)
            .await;
    }
    let allowed = Arc::new(AtomicUsize::new(usize::MAX));
    let capped = Capped {
        inner: subscriber,
        allowed: allowed.clone(),
    };
    tracing::info!(consumer = %config.name, ?limits, "consumer started");
    let backoff = config.backoff;
    let name = config.name.clone();
    let mut consumer = Consumer::new(inbox, capped, handler, config);
    let mut idle_since = Instant::now();
    let mut failures = 0u32;
    let mut rng = rand_seed();
    while !cancel.is_cancelled() {
        let s = consumer.stats();
        let settled = s.processed + s.duplicates + s.dead_lettered + s.skipped;
        if let Some(max) = limits.max_messages {
            if settled >= max {
                break;
            }
            let left = usize::try_from(max - settled).unwrap_or(usize::MAX);
            allowed.store(left, Ordering::Relaxed);
        }
        // One fetch (at most the consumer's fetch wait) and its batch; the
        // token is looked at between them, so a signal stops it promptly
        // and never in the middle of a message.
        match consumer.run_once().await {
            Ok(0) => {
                failures = 0;
                if let Some(idle) = limits.until_idle {
                    if idle_since.elapsed() >= idle {
                        break;
                    }
                }
            }
            Ok(_) => {
                failures = 0;
                idle_since = Instant::now();
            }
            Err(e) if e.retryable() => {
                failures = failures.saturating_add(1);
                let delay = backoff.delay(failures, &mut rng);
                tracing::warn!(error = %e, ?delay, "consuming failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
    let stats = consumer.stats().clone();
    tracing::info!(consumer = %name, processed = stats.processed, "consumer stopped");
    Ok(stats)
}

fn rand_seed() -> rand::rngs::StdRng {
    rand::SeedableRng::from_entropy()
}

/// A subscriber that hands out no more deliveries per fetch than
/// `allowed` (set by [`go`] from what is left of `max_messages`).
struct Capped<S> {
    inner: S,
    allowed: Arc<AtomicUsize>,
}

impl<S: Subscriber> Subscriber for Capped<S> {
    type Token = S::Token;

    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery<S::Token>>> {
        let max = max.min(self.allowed.load(Ordering::Relaxed));
        if max == 0 {
            return Ok(Vec::new());
        }
        self.inner.fetch(max, wait).await
    }

    async fn ack(&mut self, token: S::Token) -> Result<()> {
        self.inner.ack(token).await
    }

    async fn ack_all(&mut self, tokens: Vec<S::Token>) -> Result<()> {
        self.inner.ack_all(tokens).await
    }
}
