//! One conformance suite for every backend: the scenarios each store and
//! each transport must pass, written once against the ports
//! ([`OutboxStore`], [`InboxStore`], [`Subscriber`]) and run by every
//! implementation with one line.
//!
//! A backend implements a fixture ([`StoreFixture`] or
//! [`TransportFixture`]) in its `tests/conformance.rs`, on its own isolated
//! database, schema or stream, and invokes [`store_conformance!`](crate::store_conformance) or
//! [`transport_conformance!`](crate::transport_conformance) once; each expands to one `#[tokio::test]` per
//! scenario. Adding a backend is one crate plus that one line.
//!
//! ```ignore
//! // crates/<backend>/tests/conformance.rs
//! struct Fixture { /* the fresh database, its stores */ }
//! impl custody_testkit::conformance::StoreFixture for Fixture { /* … */ }
//! custody_testkit::store_conformance!(Fixture);
//! ```
//!
//! Scenarios a fixture cannot run (the memory stores keep no prune
//! history, for instance) are declared in
//! [`StoreFixture::not_applicable`] with a reason, which the test prints:
//! never a silent pass.
//!
//! The store scenarios drive the real engines (`custody_engine::Relay`,
//! `custody_engine::Consumer`) through the in-memory broker of
//! [`crate::memory`], so a store is tested apart from any transport; the
//! transport scenarios use the fixture's own way of sending (a publisher,
//! or the outbox for the embedded transports).

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};

use custody_core::{HandlerError, InboxStore, Message, OutboxStore, Subscriber};

pub mod eventstore;
pub mod inbox;
pub mod lease;
pub mod store;
pub mod transport;

/// The scenarios of the store suite a fixture may declare not applicable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// The store made unavailable and back while the relay runs.
    StoreOutage,
    /// `OutboxStore::prune` of published and dead rows.
    Prune,
    /// Prune holding back rows an embedded reader has not read.
    PruneEmbeddedReader,
    /// The operator's redrive queue (`InboxStore::redrives`).
    RedriveQueue,
    /// Numbering (`OutboxStore::assign_sequences`) and inbox floors.
    Sequences,
    /// Inbox pruning (`InboxStore::prune`).
    InboxPrune,
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A store backend under test: a fresh outbox and inbox on an isolated
/// database, and the few things the suite cannot do through the traits
/// (enqueue in the backend's transaction, look at the rows, inject an
/// outage).
pub trait StoreFixture: Sized + Send + Sync + 'static {
    /// The backend's outbox.
    type Outbox: OutboxStore;
    /// The backend's inbox.
    type Inbox: InboxStore;

    /// A fresh, migrated, isolated database; `Ok(None)` when the service is
    /// unreachable and [`crate::require_services`] allows a skip (the
    /// helpers of this crate print why).
    fn fresh() -> impl Future<Output = anyhow::Result<Option<Self>>> + Send;

    /// Why `scenario` cannot run on this backend, or `None` when it can.
    fn not_applicable(&self, scenario: Scenario) -> Option<&'static str>;

    /// The outbox (a clone of one handle: its state is shared).
    fn outbox(&self) -> Self::Outbox;

    /// The inbox (a clone of one handle).
    fn inbox(&self) -> Self::Inbox;

    /// Enqueue `messages` in one transaction of the backend and commit it
    /// (`commit`) or roll it back. Returns the positions the rows got
    /// (for a rollback: whatever the backend reports, unused).
    fn enqueue(
        &self,
        messages: &[Message],
        commit: bool,
    ) -> impl Future<Output = anyhow::Result<Vec<i64>>> + Send;

    /// Positions of the rows in the outbox table (any status), ascending.
    fn outbox_positions(&self) -> impl Future<Output = anyhow::Result<Vec<i64>>> + Send;

    /// Rows in the outbox's dead-letter table (the relay's dead letters).
    fn outbox_dead_letters(&self) -> impl Future<Output = anyhow::Result<usize>> + Send;

    /// Make the store unavailable (`down`) or available again.
    fn set_store_down(&self, down: bool) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Wait until rows committed so far are visible to the embedded reader
    /// (PostgreSQL: the visibility guard; others: at once).
    fn settle(&self) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Open the embedded reader `reader`, fetch at most `max` rows, ack
    /// them; returns their positions.
    fn read_and_ack(
        &self,
        reader: &str,
        max: usize,
    ) -> impl Future<Output = anyhow::Result<Vec<i64>>> + Send;

    /// Move embedded reader `reader`'s checkpoint to `position`.
    fn set_checkpoint(
        &self,
        reader: &str,
        position: i64,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// The operator's redrive of the dead letter of message `id` (`custody
    /// dlq redrive`) on the inbox's database.
    fn redrive(&self, id: uuid::Uuid) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// The inbox's dead letters (consumer side).
    fn inbox_dead_letters(
        &self,
    ) -> impl Future<Output = anyhow::Result<Vec<custody_core::DeadLetter>>> + Send;
}

/// A transport under test: a way to send messages and fresh subscribers on
/// one isolated stream (or database, for the embedded transports).
pub trait TransportFixture: Sized + Send + Sync + 'static {
    /// The transport's subscriber.
    type Subscriber: Subscriber;

    /// A fresh, isolated stream; `Ok(None)` to skip as for
    /// [`StoreFixture::fresh`].
    fn fresh() -> impl Future<Output = anyhow::Result<Option<Self>>> + Send;

    /// The topic every message of the suite uses.
    fn topic(&self) -> String;

    /// Send `messages`, in order, durably (a publish with its ack, or a
    /// committed outbox transaction).
    fn send(&self, messages: &[Message]) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// A new subscriber of the durable subscription `name` on the topic
    /// (a second call is a restart: it resumes after what was acked).
    fn subscriber(
        &self,
        name: &str,
    ) -> impl Future<Output = anyhow::Result<Self::Subscriber>> + Send;
}

/// Whether a fixture runs `scenario`; prints the reason when it does not.
pub(crate) fn applicable<F: StoreFixture>(fixture: &F, scenario: Scenario) -> bool {
    match fixture.not_applicable(scenario) {
        None => true,
        Some(reason) => {
            eprintln!(
                "N/A: {} on {}: {reason}",
                scenario,
                std::any::type_name::<F>()
            );
            false
        }
    }
}

/// A handler that keeps every message it applies (in memory: the suite
/// checks what reached the handler, in which order, how often).
#[derive(Debug, Clone, Default)]
pub struct Collect {
    seen: Arc<Mutex<Vec<Message>>>,
}

impl Collect {
    /// The messages applied so far, in order.
    pub fn seen(&self) -> Vec<Message> {
        match self.seen.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

impl<Tx: Send + 'static> custody_core::Handler<Tx> for Collect {
    async fn handle(&self, _tx: &mut Tx, message: &Message) -> Result<(), HandlerError> {
        match self.seen.lock() {
            Ok(mut g) => g.push(message.clone()),
            Err(p) => p.into_inner().push(message.clone()),
        }
        Ok(())
    }
}

/// Run every store scenario on `$fixture` (a [`StoreFixture`]): one
/// `#[tokio::test]` per scenario, in the invoking test crate.
#[macro_export]
macro_rules! store_conformance {
    ($fixture:ty) => {
        $crate::store_conformance!(@tests $fixture;
            enqueue_relay_consume_test,
            rollback_leaves_nothing_test,
            redelivery_is_a_duplicate_test,
            per_key_order_under_concurrency_test,
            transport_outage_and_recovery_test,
            store_outage_and_recovery_test,
            dead_letters_test,
            redrive_queue_test,
            redrive_is_the_only_token_test,
            unseen_number_is_dead_lettered_test,
            pending_rows_are_never_pruned_test,
            old_published_and_dead_rows_go_in_batches_test,
            prune_touches_only_the_given_partitions_test,
            prune_keeps_rows_an_embedded_reader_has_not_read_test,
            sequences_per_partition_under_the_lease_test,
            inbox_prune_test,
            large_payload_test,
            many_topics_test,
        );
    };
    (@tests $fixture:ty; $($name:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> {
                let Some(fixture) =
                    <$fixture as $crate::conformance::StoreFixture>::fresh().await?
                else {
                    return Ok(());
                };
                $crate::conformance::store::$name(fixture).await
            }
        )*
    };
}

/// Run every transport scenario on `$fixture` (a [`TransportFixture`]):
/// one `#[tokio::test]` per scenario.
#[macro_export]
macro_rules! transport_conformance {
    ($fixture:ty) => {
        $crate::transport_conformance!(@tests $fixture;
            publish_subscribe_test,
            unacked_is_redelivered_after_restart_test,
            order_per_key_test,
            resume_after_restart_test,
        );
    };
    (@tests $fixture:ty; $($name:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> {
                let Some(fixture) =
                    <$fixture as $crate::conformance::TransportFixture>::fresh().await?
                else {
                    return Ok(());
                };
                $crate::conformance::transport::$name(fixture).await
            }
        )*
    };
}
