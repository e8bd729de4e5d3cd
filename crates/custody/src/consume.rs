//! [`run_consumer`]: custody's [`Consumer`] with a [`DeclarativeHandler`]
//! on the consumer database at a URL, whichever backend holds it.

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
    // The limits stop the consumer through a token of their own (a signal
    // still stops it through `cancel`), so it stops as on a signal: the
    // message in hand finished, nothing left half done.
    let stop = cancel.child_token();
    let handler = handler.with_stop(stop.clone());
    let subscriber = Limited {
        inner: subscriber,
        limits,
        stop: stop.clone(),
        settled: 0,
        idle_since: Instant::now(),
    };
    Consumer::new(inbox, subscriber, handler, config)
        .run(stop)
        .await
}

/// A subscriber that enforces [`ConsumeLimits`]: it counts the deliveries
/// the consumer acknowledged (each is settled: processed, a duplicate, or
/// dead-lettered), fetches no more than the rest of `max_messages`, and
/// cancels `stop` when a limit is reached.
struct Limited<S> {
    inner: S,
    limits: ConsumeLimits,
    stop: CancellationToken,
    settled: u64,
    idle_since: Instant,
}

impl<S> Limited<S> {
    fn settle(&mut self, n: usize) {
        self.settled = self.settled.saturating_add(n as u64);
        if self
            .limits
            .max_messages
            .is_some_and(|max| self.settled >= max)
        {
            self.stop.cancel();
        }
    }
}

impl<S: Subscriber> Subscriber for Limited<S> {
    type Token = S::Token;

    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery<S::Token>>> {
        let mut max = max;
        if let Some(limit) = self.limits.max_messages {
            let left = limit.saturating_sub(self.settled);
            if left == 0 {
                self.stop.cancel();
                return Ok(Vec::new());
            }
            max = max.min(usize::try_from(left).unwrap_or(usize::MAX));
        }
        let batch = self.inner.fetch(max, wait).await?;
        if !batch.is_empty() {
            self.idle_since = Instant::now();
        } else if self
            .limits
            .until_idle
            .is_some_and(|idle| self.idle_since.elapsed() >= idle)
        {
            self.stop.cancel();
        }
        Ok(batch)
    }

    async fn ack(&mut self, token: S::Token) -> Result<()> {
        // settled whether or not the ack reaches the transport: the inbox
        // has it (a redelivery is skipped as a duplicate)
        self.settle(1);
        self.inner.ack(token).await
    }

    async fn ack_all(&mut self, tokens: Vec<S::Token>) -> Result<()> {
        self.settle(tokens.len());
        self.inner.ack_all(tokens).await
    }
}
