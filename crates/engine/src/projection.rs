//! CQRS projections: read models kept from an event store's log, exactly
//! once in effect (docs/PROJECTIONS.md).
//!
//! A [`Projection`] applies events to tables of the read model's own
//! database inside the runner's transaction, which also moves the
//! projection's checkpoint: the effects of a batch and the position they
//! include commit together or not at all, so a crash anywhere (even `kill
//! -9` mid-batch) leaves the read model and its checkpoint consistent and no
//! event is applied twice.
//!
//! The [`ProjectionRunner`] runs several projections in one process; across
//! processes at most one runner per projection is active: each holds the
//! consumer lease `projection:<name>` in the read-model database
//! ([`custody_core::ConsumerLeaseStore`]), and every transaction it opens
//! first checks the lease's epoch under the lease row's lock, so a runner
//! that stalled past its lease cannot write after another took over.
//!
//! The same runner performs what an operator requests in the read-model
//! database (`custody projection rebuild|reset|retry`): a rebuild builds the
//! next generation of tables beside the live one, in batches, while the
//! live one keeps up, and switches the views readers query in the
//! transaction that brings the new generation to the head
//! ([`custody_core::projection`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use custody_core::event::{EventStore, LogFilter, RecordedEvent};
use custody_core::projection::{
    lease_name, validate_name, validate_table, Generation, ProjectionState, ProjectionStore,
    Request, Tables,
};
use custody_core::{
    Backoff, Clock, ConsumerLease, Error, HandlerError, LeaseLost, Result, SystemClock,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metric_definitions as m;
use crate::LeaseConfig;

/// A read model kept from the event log, in the read model's database `S`.
///
/// `apply` runs inside the runner's transaction on `S::Tx` (for SQLite and
/// PostgreSQL a `sqlx::Transaction`): write only through it, to the tables
/// [`Tables::name`] gives, so the effects commit with the checkpoint.
/// Readers query the views named by [`Projection::tables`].
pub trait Projection<S: ProjectionStore>: Send + Sync + 'static {
    /// The projection's name: 1..=100 of `[A-Za-z0-9_]` (it names the lease,
    /// the checkpoint and, in `custody projection`, the projection).
    fn name(&self) -> &str;

    /// The code version. When it differs from the version that built the
    /// active generation, the runner rebuilds beside it and switches.
    fn version(&self) -> u32;

    /// The events it reads (the others are skipped, the checkpoint passes
    /// them).
    fn filter(&self) -> LogFilter;

    /// The base names of the read model's tables: each generation has its
    /// own `<base>_g<n>` table, readers query the view `<base>`.
    fn tables(&self) -> Vec<String>;

    /// Create the tables of a new generation ([`Tables::name`] of each
    /// base), inside the runner's transaction.
    fn setup(
        &self,
        tx: &mut S::Tx,
        tables: &Tables,
    ) -> impl Future<Output = std::result::Result<(), HandlerError>> + Send;

    /// Apply one event. A [`HandlerError::Transient`] error rolls the batch
    /// back and retries it after a backoff; a permanent one (or an unknown
    /// type) dead-letters the event and goes on.
    fn apply(
        &self,
        tx: &mut S::Tx,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> impl Future<Output = std::result::Result<(), HandlerError>> + Send;
}

/// How a projection runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProjectionConfig {
    /// Events per transaction. Default 500.
    pub batch_size: usize,
    /// The lease that keeps one runner per projection active.
    pub lease: LeaseConfig,
    /// How often an idle runner looks for operator requests (appends wake
    /// it for events). Default 1 s.
    #[serde(with = "custody_core::duration_serde")]
    pub idle_wait: Duration,
    /// Backoff after a failed batch (a transient error of the projection,
    /// a store that is down).
    pub backoff: Backoff,
}

impl Default for ProjectionConfig {
    fn default() -> Self {
        ProjectionConfig {
            batch_size: 500,
            lease: LeaseConfig::default(),
            idle_wait: Duration::from_secs(1),
            backoff: Backoff::default(),
        }
    }
}

/// What a runner knows of its projection, live (the in-process form of
/// `custody projection status`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunnerStatus {
    /// This runner holds the projection's lease.
    pub active: bool,
    /// The active generation, as of the last batch.
    pub generation: Option<Generation>,
    /// A generation being rebuilt beside it.
    pub rebuilding: Option<Generation>,
    /// The gap-free head when the runner last read.
    pub head: u64,
    /// Positions between the active checkpoint and that head.
    pub lag_events: u64,
    /// While behind: seconds since the last applied event was recorded;
    /// 0 when caught up.
    pub lag_seconds: f64,
    /// Events this runner applied.
    pub applied: u64,
    /// Events this runner dead-lettered.
    pub dead_lettered: u64,
}

/// Runs projections, each in a task of its own, until [`Self::stop`].
pub struct ProjectionRunner<E, S> {
    events: E,
    store: S,
    clock: Arc<dyn Clock>,
    token: CancellationToken,
    tasks: JoinSet<()>,
    status: BTreeMap<String, watch::Receiver<RunnerStatus>>,
}

impl<E, S> std::fmt::Debug for ProjectionRunner<E, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionRunner")
            .field("projections", &self.status.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl<E: EventStore, S: ProjectionStore> ProjectionRunner<E, S> {
    /// A runner reading `events` and writing read models to `store` (the
    /// read model's database, migrated by custody).
    pub fn new(events: E, store: S) -> Self {
        ProjectionRunner {
            events,
            store,
            clock: Arc::new(SystemClock),
            token: CancellationToken::new(),
            tasks: JoinSet::new(),
            status: BTreeMap::new(),
        }
    }

    /// Use `clock` for lease times and lag (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Stop with `token` too (e.g. [`crate::shutdown_token`]).
    pub fn with_token(mut self, token: CancellationToken) -> Self {
        self.token = token.child_token();
        self
    }

    /// Start running `projection`. Its name and table names are checked,
    /// and a name already running here is refused.
    pub fn spawn<P: Projection<S>>(
        &mut self,
        projection: P,
        config: ProjectionConfig,
    ) -> Result<()> {
        let name = projection.name().to_owned();
        validate_name(&name)?;
        let bases = projection.tables();
        for base in &bases {
            validate_table(base)?;
        }
        config.lease.validate()?;
        if self.status.contains_key(&name) {
            return Err(Error::Config(format!(
                "projection {name:?} is already running in this runner; give each projection its own name"
            )));
        }
        let (tx, rx) = watch::channel(RunnerStatus::default());
        self.status.insert(name.clone(), rx);
        let worker = Worker {
            events: self.events.clone(),
            store: self.store.clone(),
            filter: projection.filter(),
            projection,
            config,
            clock: self.clock.clone(),
            lease_name: lease_name(&name),
            name,
            bases,
            status: tx,
            token: self.token.clone(),
            turn: false,
            last_seconds: 0.0,
        };
        self.tasks.spawn(worker.run());
        Ok(())
    }

    /// The live status of projection `name`.
    pub fn status(&self, name: &str) -> Option<RunnerStatus> {
        self.status.get(name).map(|rx| rx.borrow().clone())
    }

    /// A receiver of `name`'s status, updated after every batch.
    pub fn watch(&self, name: &str) -> Option<watch::Receiver<RunnerStatus>> {
        self.status.get(name).cloned()
    }

    /// Stop every projection: the batch in flight commits or rolls back,
    /// each lease is released (a standby takes over at once), then return.
    pub async fn stop(mut self) {
        self.token.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

struct Worker<E, S, P> {
    events: E,
    store: S,
    projection: P,
    filter: LogFilter,
    config: ProjectionConfig,
    clock: Arc<dyn Clock>,
    name: String,
    lease_name: String,
    bases: Vec<String>,
    status: watch::Sender<RunnerStatus>,
    token: CancellationToken,
    /// With a rebuild in progress, batches alternate between the active and
    /// the building generation.
    turn: bool,
    last_seconds: f64,
}

enum Exit {
    Stopped,
    Lost,
}

enum Step {
    /// More to do at once.
    Busy,
    /// Caught up at this checkpoint: wait for the head to pass it.
    Idle(u64),
}

/// Why a step failed: the store (retryable or not), or the projection's
/// transient error.
enum StepError {
    Store(Error),
    Transient(HandlerError),
}

impl From<Error> for StepError {
    fn from(e: Error) -> Self {
        StepError::Store(e)
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Store(e) => write!(f, "{e}"),
            StepError::Transient(e) => write!(f, "the projection failed: {e}"),
        }
    }
}

enum Batch {
    Applied(u64),
    Poison(u64, String),
}

fn lease_lost(e: &Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<LeaseLost>().is_some() {
            return true;
        }
        source = s.source();
    }
    false
}

fn setup_error(name: &str, e: HandlerError) -> StepError {
    match e {
        HandlerError::Transient(_) => StepError::Transient(e),
        e => StepError::Store(Error::Config(format!(
            "projection {name:?}: creating the tables of a new generation failed ({e}); fix the projection's setup"
        ))),
    }
}

impl<E: EventStore, S: ProjectionStore, P: Projection<S>> Worker<E, S, P> {
    async fn run(mut self) {
        let holder = self.config.lease.holder.clone();
        loop {
            if self.token.is_cancelled() {
                return;
            }
            let now = self.clock.now();
            match self
                .store
                .acquire_consumer_lease(&self.lease_name, &holder, self.config.lease.ttl, now)
                .await
            {
                Ok(Some(lease)) => {
                    info!(projection = %self.name, holder = %holder, epoch = lease.epoch, "projection lease taken; this runner is active");
                    self.status.send_modify(|s| s.active = true);
                    metrics::gauge!(m::PROJECTION_ACTIVE, "projection" => self.name.clone())
                        .set(1.0);
                    let exit = self.leased(&lease).await;
                    self.status.send_modify(|s| s.active = false);
                    metrics::gauge!(m::PROJECTION_ACTIVE, "projection" => self.name.clone())
                        .set(0.0);
                    match exit {
                        Exit::Stopped => {
                            if let Err(e) = self.store.release_consumer_lease(&lease).await {
                                warn!(projection = %self.name, error = %e, "releasing the projection lease failed; a standby takes over when it expires");
                            }
                            return;
                        }
                        Exit::Lost => {
                            warn!(projection = %self.name, "projection lease lost to another runner; standing by")
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(projection = %self.name, error = %e, "taking the projection lease failed; trying again")
                }
            }
            tokio::select! {
                _ = self.token.cancelled() => return,
                _ = tokio::time::sleep(self.config.lease.renew_interval) => {},
            }
        }
    }

    async fn leased(&mut self, lease: &ConsumerLease) -> Exit {
        let mut renewed = Instant::now();
        let mut failures = 0u32;
        loop {
            if self.token.is_cancelled() {
                return Exit::Stopped;
            }
            if renewed.elapsed() >= self.config.lease.renew_interval {
                match self
                    .store
                    .renew_consumer_lease(lease, self.config.lease.ttl, self.clock.now())
                    .await
                {
                    Ok(true) => renewed = Instant::now(),
                    Ok(false) => return Exit::Lost,
                    // the fence keeps a takeover from mixing writes; go on
                    Err(e) => {
                        warn!(projection = %self.name, error = %e, "renewing the projection lease failed")
                    }
                }
            }
            match self.step(lease).await {
                Ok(Step::Busy) => failures = 0,
                Ok(Step::Idle(checkpoint)) => {
                    failures = 0;
                    let wait = self.config.idle_wait.min(self.config.lease.renew_interval);
                    tokio::select! {
                        _ = self.token.cancelled() => return Exit::Stopped,
                        _ = self.events.wait_for_head(checkpoint, wait) => {},
                    }
                }
                Err(StepError::Store(e)) if lease_lost(&e) => return Exit::Lost,
                Err(e) => {
                    failures += 1;
                    let delay = self.config.backoff.delay(failures, &mut rand::thread_rng());
                    warn!(projection = %self.name, error = %e, ?delay, "projection batch failed; retrying");
                    tokio::select! {
                        _ = self.token.cancelled() => return Exit::Stopped,
                        _ = tokio::time::sleep(delay) => {},
                    }
                }
            }
        }
    }

    /// A transaction of the lease holder: begun and fenced.
    async fn begin(&self, lease: &ConsumerLease) -> Result<S::Tx> {
        let mut tx = self.store.begin().await?;
        self.store.check_consumer_lease(&mut tx, lease).await?;
        Ok(tx)
    }

    /// Create generation `generation` with `checkpoint` and its tables.
    async fn new_generation(
        &self,
        tx: &mut S::Tx,
        generation: u64,
        checkpoint: u64,
    ) -> std::result::Result<(), StepError> {
        let g = Generation {
            generation,
            version: self.projection.version(),
            checkpoint,
            applied: 0,
        };
        self.store
            .create_generation(tx, &self.name, &g, self.clock.now())
            .await?;
        self.projection
            .setup(tx, &Tables::new(generation))
            .await
            .map_err(|e| setup_error(&self.name, e))
    }

    async fn step(&mut self, lease: &ConsumerLease) -> std::result::Result<Step, StepError> {
        let mut tx = self.begin(lease).await?;
        let Some(state) = self.store.load(&mut tx, &self.name).await? else {
            // first start: generation 1 from the beginning of the log
            self.new_generation(&mut tx, 1, 0).await?;
            self.store
                .activate(&mut tx, &self.name, 1, &self.bases)
                .await?;
            self.store.commit(tx).await?;
            info!(projection = %self.name, "projection created (generation 1)");
            return Ok(Step::Busy);
        };
        let next = state
            .building
            .as_ref()
            .map_or(state.active.generation, |b| b.generation)
            + 1;
        if let Some(request) = state.request {
            if let Some(b) = &state.building {
                self.store
                    .drop_generation(&mut tx, &self.name, b.generation, &self.bases)
                    .await?;
            }
            match request {
                Request::Rebuild => {
                    self.new_generation(&mut tx, next, 0).await?;
                    self.store.clear_request(&mut tx, &self.name).await?;
                    info!(projection = %self.name, generation = next, "rebuild requested: building the next generation beside the active one");
                }
                Request::Reset { to } => {
                    self.new_generation(&mut tx, next, to).await?;
                    self.store
                        .activate(&mut tx, &self.name, next, &self.bases)
                        .await?;
                    self.store.clear_request(&mut tx, &self.name).await?;
                    info!(projection = %self.name, generation = next, to, "reset requested: an empty generation from this position is active");
                }
            }
            self.store.commit(tx).await?;
            let g = Generation {
                generation: next,
                version: self.projection.version(),
                checkpoint: match request {
                    Request::Rebuild => 0,
                    Request::Reset { to } => to,
                },
                applied: 0,
            };
            self.status.send_modify(|s| match request {
                Request::Rebuild => s.rebuilding = Some(g),
                Request::Reset { .. } => {
                    s.generation = Some(g);
                    s.rebuilding = None;
                }
            });
            return Ok(Step::Busy);
        }
        if state.building.is_none() && state.active.version != self.projection.version() {
            self.new_generation(&mut tx, next, 0).await?;
            self.store.commit(tx).await?;
            info!(projection = %self.name, generation = next, from = state.active.version, to = self.projection.version(), "projection code version changed: rebuilding beside the active generation");
            return Ok(Step::Busy);
        }
        let retries = self
            .store
            .retries(&mut tx, &self.name, state.active.generation)
            .await?;
        if !retries.is_empty() {
            drop(tx);
            self.retry_dead_letters(lease, &state.active, &retries)
                .await?;
            return Ok(Step::Busy);
        }
        self.batch(lease, tx, &state).await
    }

    /// One batch for one generation: the active one, or the one being
    /// rebuilt (alternately while a rebuild runs; only the rebuilt one when
    /// the active one was built by another code version, which this
    /// process cannot apply).
    async fn batch(
        &mut self,
        lease: &ConsumerLease,
        mut tx: S::Tx,
        state: &ProjectionState,
    ) -> std::result::Result<Step, StepError> {
        let active_current = state.active.version == self.projection.version();
        let target = match &state.building {
            Some(b) if !active_current || self.turn => b.clone(),
            _ => state.active.clone(),
        };
        self.turn = !self.turn;
        let is_active = target.generation == state.active.generation;
        let tables = Tables::new(target.generation);
        let slice = self
            .events
            .read_all(
                target.checkpoint,
                &self.filter,
                self.config.batch_size.max(1),
            )
            .await?;
        let mut dead: BTreeMap<u64, String> = BTreeMap::new();
        let applied = loop {
            match self
                .apply_all(&mut tx, &tables, &slice.events, &dead)
                .await?
            {
                Batch::Applied(n) => break n,
                Batch::Poison(position, reason) => {
                    // what the failed apply wrote goes with the rollback;
                    // the batch runs again without that event
                    warn!(projection = %self.name, position, reason = %reason, "projection failed on an event permanently; dead-lettering it");
                    dead.insert(position, reason);
                    drop(tx);
                    tx = self.begin(lease).await?;
                }
            }
        };
        let now = self.clock.now();
        for event in &slice.events {
            if let Some(reason) = dead.get(&event.position) {
                self.store
                    .dead_letter_event(&mut tx, &self.name, target.generation, event, reason, now)
                    .await?;
            }
        }
        let checkpoint = slice.scanned_to.max(target.checkpoint);
        self.store
            .save_checkpoint(&mut tx, &self.name, target.generation, checkpoint, applied)
            .await?;
        let caught_up = checkpoint >= slice.head;
        let mut switched = false;
        if is_active {
            let lag_events = slice.head.saturating_sub(checkpoint);
            self.last_seconds = if lag_events == 0 {
                0.0
            } else {
                slice.events.last().map_or(self.last_seconds, |e| {
                    (now - e.recorded_at).num_milliseconds().max(0) as f64 / 1000.0
                })
            };
            self.store
                .report(
                    &mut tx,
                    &self.name,
                    slice.head,
                    lag_events,
                    self.last_seconds,
                    now,
                )
                .await?;
        } else if caught_up && checkpoint >= state.active.checkpoint {
            // the rebuilt generation reached the head and is at least as far
            // as the live one: the views move to it in this transaction,
            // with its last batch and checkpoint
            self.store
                .activate(&mut tx, &self.name, target.generation, &self.bases)
                .await?;
            switched = true;
        }
        self.store.commit(tx).await?;
        if switched {
            info!(projection = %self.name, generation = target.generation, checkpoint, "rebuilt generation caught up: readers switched to it");
        }
        let generation = Generation {
            checkpoint,
            applied: target.applied + applied,
            ..target
        };
        let dead_count = dead.len() as u64;
        metrics::counter!(m::PROJECTION_APPLIED_TOTAL, "projection" => self.name.clone())
            .increment(applied);
        if dead_count > 0 {
            metrics::counter!(m::PROJECTION_DEAD_LETTERED_TOTAL, "projection" => self.name.clone())
                .increment(dead_count);
        }
        let seconds = self.last_seconds;
        self.status.send_modify(|s| {
            s.applied += applied;
            s.dead_lettered += dead_count;
            s.head = slice.head;
            if is_active || switched {
                s.generation = Some(generation.clone());
                s.lag_events = slice.head.saturating_sub(checkpoint);
                s.lag_seconds = if switched { 0.0 } else { seconds };
            }
            if switched {
                s.rebuilding = None;
            } else if !is_active {
                s.rebuilding = Some(generation.clone());
            } else if state.building.is_none() {
                s.rebuilding = None;
            }
        });
        if is_active {
            metrics::gauge!(m::PROJECTION_LAG_EVENTS, "projection" => self.name.clone())
                .set(slice.head.saturating_sub(checkpoint) as f64);
            metrics::gauge!(m::PROJECTION_LAG_SECONDS, "projection" => self.name.clone())
                .set(seconds);
        } else if !switched {
            metrics::gauge!(m::PROJECTION_REBUILD_POSITION, "projection" => self.name.clone())
                .set(checkpoint as f64);
        }
        if caught_up && state.building.is_none() {
            Ok(Step::Idle(checkpoint))
        } else {
            Ok(Step::Busy)
        }
    }

    async fn apply_all(
        &self,
        tx: &mut S::Tx,
        tables: &Tables,
        events: &[RecordedEvent],
        dead: &BTreeMap<u64, String>,
    ) -> std::result::Result<Batch, StepError> {
        let mut applied = 0;
        for event in events {
            if dead.contains_key(&event.position) {
                continue;
            }
            match self.projection.apply(tx, tables, event).await {
                Ok(()) => applied += 1,
                Err(e @ HandlerError::Transient(_)) => return Err(StepError::Transient(e)),
                Err(e) => return Ok(Batch::Poison(event.position, e.to_string())),
            }
        }
        Ok(Batch::Applied(applied))
    }

    /// Apply again the dead letters an operator asked to retry, each in a
    /// transaction of its own: applied, its dead letter goes; failed again,
    /// its reason is updated and it stays.
    async fn retry_dead_letters(
        &mut self,
        lease: &ConsumerLease,
        active: &Generation,
        positions: &[u64],
    ) -> std::result::Result<(), StepError> {
        let tables = Tables::new(active.generation);
        for &position in positions {
            let slice = self
                .events
                .read_all(position.saturating_sub(1), &self.filter, 1)
                .await?;
            let mut tx = self.begin(lease).await?;
            let event = slice.events.into_iter().find(|e| e.position == position);
            let failure = match &event {
                None => None,
                Some(event) => match self.projection.apply(&mut tx, &tables, event).await {
                    Ok(()) => None,
                    Err(e @ HandlerError::Transient(_)) => return Err(StepError::Transient(e)),
                    Err(e) => Some(e.to_string()),
                },
            };
            match (failure, event) {
                (Some(reason), Some(event)) => {
                    drop(tx);
                    let mut tx = self.begin(lease).await?;
                    self.store
                        .dead_letter_event(
                            &mut tx,
                            &self.name,
                            active.generation,
                            &event,
                            &reason,
                            self.clock.now(),
                        )
                        .await?;
                    self.store.commit(tx).await?;
                    warn!(projection = %self.name, position, reason = %reason, "retried dead letter failed again");
                }
                (_, event) => {
                    // applied, or no longer in the log (nothing to apply)
                    self.store
                        .remove_dead_letter(&mut tx, &self.name, active.generation, position)
                        .await?;
                    self.store.commit(tx).await?;
                    info!(projection = %self.name, position, found = event.is_some(), "dead letter retried");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_lost_is_found_in_the_chain() {
        let lease = ConsumerLease {
            consumer: "projection:p".into(),
            holder: "a".into(),
            epoch: 1,
        };
        let err = LeaseLost::check("sqlite", &lease, Some((Some("b".into()), 2))).unwrap_err();
        assert!(lease_lost(&err));
        assert!(!lease_lost(&Error::Config("x".into())));
    }

    #[test]
    fn config_defaults_parse() {
        let c: ProjectionConfig = serde_json::from_str(r#"{"batch-size": 10}"#).unwrap();
        assert_eq!(c.batch_size, 10);
        assert_eq!(c.idle_wait, Duration::from_secs(1));
    }
}
