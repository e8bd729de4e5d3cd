//! CQRS projections, the read-model side: what a projection's database
//! keeps (generations, checkpoints, operator requests, dead letters) and the
//! ports a backend implements for it ([`ProjectionStore`] for the runner,
//! [`ProjectionAdmin`] for `custody projection`).
//!
//! A projection's read model lives in **generations**: tables named
//! `<base>_g<generation>` ([`Tables`]) and, for each base name, a view
//! `<base>` over the active generation's table, which is what readers query.
//! A rebuild builds the next generation beside the active one and switches
//! the views and the active-generation pointer in one transaction
//! ([`ProjectionStore::activate`]), so readers never see a missing or a
//! half-built read model. Each generation has its own checkpoint, written in
//! the same transaction as what the projection applied (exactly once in
//! effect, docs/PROJECTIONS.md).
//!
//! ```
//! use custody_core::projection::Tables;
//!
//! let tables = Tables::new(3);
//! assert_eq!(tables.name("balances"), "balances_g3");
//! assert_eq!(tables.generation(), 3);
//! ```

use std::future::Future;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::admin::BoxFuture;
use crate::event::RecordedEvent;
use crate::{ConsumerLeaseStore, Error, Result};

/// The consumer-lease name a projection's runner holds
/// ([`ConsumerLeaseStore`]): `projection:<name>`.
pub fn lease_name(projection: &str) -> String {
    format!("projection:{projection}")
}

/// Check a projection name: 1..=100 bytes of ASCII letters, digits and `_`
/// (it becomes part of table names). The error says what to change.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 100
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(Error::Config(format!(
            "projection name {name:?} must be 1 to 100 ASCII letters, digits or underscores (e.g. \"account_balances\")"
        )));
    }
    Ok(())
}

/// Check a read-model table's base name the same way as [`validate_name`]:
/// the store puts it into DDL (`CREATE VIEW`), so nothing but
/// `[A-Za-z0-9_]` may reach it.
pub fn validate_table(base: &str) -> Result<()> {
    if base.is_empty()
        || base.len() > 50
        || !base.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(Error::Config(format!(
            "read-model table name {base:?} must be 1 to 50 ASCII letters, digits or underscores"
        )));
    }
    Ok(())
}

/// The table names of one generation of a read model: what a projection
/// writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tables {
    generation: u64,
}

impl Tables {
    /// The tables of `generation`.
    pub fn new(generation: u64) -> Self {
        Tables { generation }
    }

    /// The generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The table that holds `base` in this generation: `<base>_g<n>`
    /// (readers query the view `<base>`).
    pub fn name(&self, base: &str) -> String {
        format!("{base}_g{}", self.generation)
    }
}

/// One generation of a projection's read model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// Its number (1 for the first build; each rebuild or reset takes the
    /// next).
    pub generation: u64,
    /// The projection's code version that builds it.
    pub version: u32,
    /// The log position it has applied up to (inclusive).
    pub checkpoint: u64,
    /// Events applied to it so far.
    pub applied: u64,
}

/// What an operator asked the active runner to do (`custody projection
/// rebuild|reset`); the runner does it and clears the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Request {
    /// Build a new generation from position 0 beside the active one, then
    /// switch to it.
    Rebuild,
    /// Replace the read model at once by an empty generation whose
    /// checkpoint is `to` (events up to `to` are not applied): readers see
    /// an empty read model that fills up again.
    Reset {
        /// The new generation's checkpoint.
        to: u64,
    },
}

/// A projection's state as its runner reads it inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionState {
    /// The generation readers see.
    pub active: Generation,
    /// A generation being built beside it (a rebuild in progress).
    pub building: Option<Generation>,
    /// An operator's pending request.
    pub request: Option<Request>,
}

/// What `custody projection status` shows for one projection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionStatus {
    /// The projection's name.
    pub name: String,
    /// The active generation (readers' view).
    pub active: Generation,
    /// The gap-free head of the event log when the runner last looked.
    pub head: u64,
    /// Positions between the active checkpoint and that head.
    pub lag_events: u64,
    /// Age of the oldest event not applied yet when the runner last looked
    /// (0 when caught up).
    pub lag_seconds: f64,
    /// When the runner last reported (a stale time: no runner is running).
    pub reported_at: Option<DateTime<Utc>>,
    /// Holder of the projection's lease (the active runner), if any.
    pub runner: Option<String>,
    /// Until when that lease runs unless renewed.
    pub runner_until: Option<DateTime<Utc>>,
    /// A rebuild in progress: the generation being built.
    pub rebuild: Option<Generation>,
    /// An operator's request not yet taken up by a runner.
    pub request: Option<Request>,
    /// Dead letters of the active generation.
    pub dead_letters: u64,
}

/// An event a projection failed on permanently: recorded with its reason,
/// skipped, and the projection went on (docs/ARCHITECTURE.md invariant 6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectionDeadLetter {
    /// The projection.
    pub projection: String,
    /// The generation it failed in.
    pub generation: u64,
    /// The event's log position.
    pub position: u64,
    /// The event's stream.
    pub stream: String,
    /// The event's version in its stream.
    pub stream_version: u64,
    /// The event's id.
    pub event_id: uuid::Uuid,
    /// The event's type.
    pub event_type: String,
    /// What the projection said.
    pub reason: String,
    /// When it failed.
    pub failed_at: DateTime<Utc>,
    /// An operator asked for it to be applied again
    /// ([`ProjectionAdmin::retry`]).
    pub retry_requested: bool,
}

/// The read-model side of projections, in the read model's own database
/// (the same database as the consumer lease the runner holds, so the lease's
/// fence runs inside the projection's transaction).
///
/// Every method taking `tx` runs inside the runner's transaction, which
/// already passed [`ConsumerLeaseStore::check_consumer_lease`]: only the
/// lease holder writes.
pub trait ProjectionStore: ConsumerLeaseStore {
    /// The projection's state (`None`: never started).
    fn load(
        &self,
        tx: &mut Self::Tx,
        name: &str,
    ) -> impl Future<Output = Result<Option<ProjectionState>>> + Send;

    /// Record a new generation (`building` until [`Self::activate`]) whose
    /// checkpoint is `checkpoint`; creates the projection's record if it
    /// has none.
    fn create_generation(
        &self,
        tx: &mut Self::Tx,
        name: &str,
        generation: &Generation,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Set `generation`'s checkpoint to `position` and add `applied` to its
    /// count.
    fn save_checkpoint(
        &self,
        tx: &mut Self::Tx,
        name: &str,
        generation: u64,
        position: u64,
        applied: u64,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Make `generation` the active one: point the view of each of `bases`
    /// at its table ([`Tables::name`]), drop the previous active
    /// generation's tables, its dead letters and its record. Returns the
    /// previous active generation.
    fn activate(
        &self,
        tx: &mut Self::Tx,
        name: &str,
        generation: u64,
        bases: &[String],
    ) -> impl Future<Output = Result<Option<u64>>> + Send;

    /// Drop a generation that will never be active (a rebuild abandoned for
    /// another): its tables, dead letters and record.
    fn drop_generation(
        &self,
        tx: &mut Self::Tx,
        name: &str,
        generation: u64,
        bases: &[String],
    ) -> impl Future<Output = Result<()>> + Send;

    /// Clear the pending request (taken up).
    fn clear_request(
        &self,
        tx: &mut Self::Tx,
        name: &str,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Record what the runner saw: the head, the lag, the time.
    fn report(
        &self,
        tx: &mut Self::Tx,
        name: &str,
        head: u64,
        lag_events: u64,
        lag_seconds: f64,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Record `event` as dead for `generation` with `reason`.
    fn dead_letter_event(
        &self,
        tx: &mut Self::Tx,
        name: &str,
        generation: u64,
        event: &RecordedEvent,
        reason: &str,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Positions of `generation`'s dead letters an operator asked to retry.
    fn retries(
        &self,
        tx: &mut Self::Tx,
        name: &str,
        generation: u64,
    ) -> impl Future<Output = Result<Vec<u64>>> + Send;

    /// Remove a dead letter (its retry applied the event).
    fn remove_dead_letter(
        &self,
        tx: &mut Self::Tx,
        name: &str,
        generation: u64,
        position: u64,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// The operator's port on a read-model database (`custody projection`),
/// usable as `dyn`; each backend provides one, opened by URL through the
/// facade (`custody::projection::open_projection_admin`).
pub trait ProjectionAdmin: Send + Sync {
    /// Status of every projection (or of `name` only), by name.
    fn status<'a>(&'a self, name: Option<&'a str>) -> BoxFuture<'a, Result<Vec<ProjectionStatus>>>;

    /// Ask the active runner of `name` for `request`. An unknown
    /// projection is an error naming the known ones; a pending request is
    /// replaced.
    fn request<'a>(&'a self, name: &'a str, request: Request) -> BoxFuture<'a, Result<()>>;

    /// The active generation's dead letters of `name`, by position.
    fn dead_letters<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ProjectionDeadLetter>>>;

    /// Ask the runner to apply the dead letter at `position` again (every
    /// dead letter of `name` when `None`); returns how many were marked.
    fn retry<'a>(&'a self, name: &'a str, position: Option<u64>) -> BoxFuture<'a, Result<u64>>;
}

/// The error for a projection a read-model database does not know.
pub fn unknown_projection(name: &str, known: &[String]) -> Error {
    Error::Config(format!(
        "no projection {name:?} in this read-model database (known: {}); check the name and --db, a projection appears once its runner has started",
        if known.is_empty() {
            "none".to_owned()
        } else {
            known.join(", ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_reaching_ddl_are_plain() {
        assert!(validate_name("account_balances").is_ok());
        assert!(validate_name("a; DROP TABLE x").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_table("balances").is_ok());
        assert!(validate_table("bal\"ances").is_err());
        assert_eq!(lease_name("p1"), "projection:p1");
    }

    #[test]
    fn requests_serialize_tagged() {
        let r = serde_json::to_string(&Request::Reset { to: 5 }).unwrap();
        assert_eq!(r, r#"{"kind":"reset","to":5}"#);
        let back: Request = serde_json::from_str(r#"{"kind":"rebuild"}"#).unwrap();
        assert_eq!(back, Request::Rebuild);
    }
}
