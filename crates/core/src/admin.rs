//! The operations port: what an operator (the `custody` command, the
//! server) does to a custody database, whichever backend holds it, and the
//! registry that turns a database URL into that backend.
//!
//! - [`Admin`]: dead letters (list, redrive, purge), message status
//!   (`trace`), embedded-reader checkpoints, the names a database has seen,
//!   gap acceptance and the history both sides of a reconciliation read.
//!   It is `dyn`-compatible (methods return [`BoxFuture`]s), so callers hold
//!   a `Box<dyn Admin>` and never match on a backend.
//! - [`Driver`]: one per backend crate (`custody_sqlite::DRIVER`,
//!   `custody_postgres::DRIVER`), naming the URL forms it accepts and
//!   opening a database for reading ([`Access::Existing`]: never creates or
//!   migrates anything) or for writing ([`Access::Migrate`]). The `custody`
//!   facade collects the drivers of the backends compiled in
//!   (`custody::drivers()`), as sqlx's `Any` driver does.
//!
//! What a redrive does to each kind of dead letter is decided once, here
//! ([`redrive_target`]); backends run the SQL.

use std::future::Future;
use std::pin::Pin;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::history::{DynProcessedHistory, DynSentHistory};
use crate::sequence::{AcceptedGap, GapAcceptance};
use crate::{DeadLetter, Error, MessageStatus, Result};

/// A boxed, sendable future: the return type of `dyn`-compatible async methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A dead letter with its sequence number in the dead-letter table (the
/// handle `redrive` and `purge` take, `#<seq>` in the CLI).
pub type NumberedDeadLetter = (i64, DeadLetter);

/// Operations over one custody database. Implemented once per backend
/// (`custody_sqlite::SqliteAdmin`, `custody_postgres::PgAdmin`); obtained
/// from a URL through a [`Driver`].
pub trait Admin: Send + Sync {
    /// The backend's name (`sqlite`, `postgres`), for messages.
    fn backend(&self) -> &'static str;

    /// Every dead letter (the relay's and consumers'), oldest first, with its
    /// sequence number.
    fn dead_letters(&self) -> BoxFuture<'_, Result<Vec<NumberedDeadLetter>>>;

    /// Send dead letters `seqs` back, each in its own transaction, as
    /// [`redrive_target`] decides: a consumer's to that consumer's redrive
    /// queue (processed once through its inbox), the relay's back to
    /// pending in the outbox. What cannot be redriven is skipped, with why.
    fn redrive<'a>(
        &'a self,
        seqs: &'a [i64],
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<RedriveOutcome>>;

    /// Delete dead letters `seqs`; a consumer's inbox row stays, so a late
    /// redelivery is still skipped. Returns how many were deleted.
    fn purge<'a>(&'a self, seqs: &'a [i64]) -> BoxFuture<'a, Result<u64>>;

    /// Everything this database knows about message `id`.
    fn status(&self, id: Uuid) -> BoxFuture<'_, Result<MessageStatus>>;

    /// The stored checkpoint of embedded reader `subscription`, or `None`.
    fn checkpoint<'a>(&'a self, subscription: &'a str) -> BoxFuture<'a, Result<Option<i64>>>;

    /// Move the checkpoint of `subscription` back to just before the
    /// earliest outbox row of `ids` (never forward); the new position, or
    /// `None` when nothing needed rewinding. Stop the consumer first.
    fn rewind_checkpoint<'a>(
        &'a self,
        subscription: &'a str,
        ids: &'a [Uuid],
    ) -> BoxFuture<'a, Result<Option<i64>>>;

    /// Whether `topic` appears anywhere in this database.
    fn topic_seen<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<bool>>;

    /// Whether consumer `name` has recorded anything in this database.
    fn consumer_seen<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool>>;

    /// Up to `limit` topics this database knows, sorted.
    fn topics(&self, limit: u32) -> BoxFuture<'_, Result<Vec<String>>>;

    /// Up to `limit` consumer names this database knows, sorted.
    fn consumers(&self, limit: u32) -> BoxFuture<'_, Result<Vec<String>>>;

    /// Raise `consumer`'s floor past numbers that will never arrive, with an
    /// audit record ([`crate::InboxStore::accept_gap`]).
    fn accept_gap<'a>(
        &'a self,
        consumer: &'a str,
        gap: &'a GapAcceptance,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<AcceptedGap>>;

    /// This database as a producer: its outbox's history.
    fn sent(&self) -> &dyn DynSentHistory;

    /// This database as a consumer's: its inbox's history.
    fn processed(&self) -> &dyn DynProcessedHistory;
}

/// What [`Admin::redrive`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveOutcome {
    /// Consumer dead letters queued for their consumer again.
    pub to_consumer: u64,
    /// Relay dead letters put back to pending in the outbox.
    pub to_relay: u64,
    /// Dead letters left in place, with the reason.
    pub skipped: Vec<(i64, String)>,
}

impl RedriveOutcome {
    /// Count what the redrive of dead letter `seq` did.
    pub fn add(&mut self, seq: i64, step: RedriveStep) {
        match step {
            RedriveStep::ToConsumer => self.to_consumer += 1,
            RedriveStep::ToRelay => self.to_relay += 1,
            RedriveStep::Skipped(why) => self.skipped.push((seq, why.to_owned())),
        }
    }
}

/// What the redrive of one dead letter did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedriveStep {
    /// Queued for its consumer again.
    ToConsumer,
    /// Its outbox row is pending again.
    ToRelay,
    /// Left in place, for this reason.
    Skipped(&'static str),
}

/// Why a dead letter named by its sequence number was not redriven.
pub const SKIP_NO_SUCH: &str = "no such dead letter (already redriven or purged)";
/// Why a relay dead letter whose outbox row is gone was not redriven.
pub const SKIP_OUTBOX_ROW_GONE: &str = "its outbox row is gone (pruned) or no longer dead; re-enqueue the message from the envelope `custody dlq show` prints";
const SKIP_NO_ENVELOPE: &str = "malformed message without a readable envelope: nothing to redrive; fix the producer and purge it";
const SKIP_UNREADABLE: &str = "stored envelope is not a readable message; purge it";

/// Where a dead letter goes when redriven, decided from its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedriveTarget<'a> {
    /// A consumer's (`consumer:<name>`) with a readable envelope: to that
    /// consumer's redrive queue; its inbox row is marked so the next record
    /// counts as new once.
    Consumer {
        /// The consumer's name.
        consumer: &'a str,
        /// The message id.
        id: Uuid,
        /// The stored envelope (JSON of a [`crate::Message`]).
        envelope: &'a str,
    },
    /// The relay's: the outbox row `id` goes back to pending (attempts 0,
    /// marked as a republish, its number cleared: the skip marker left in
    /// its place accounted for the old one). `None`: no id, nothing to reset.
    Relay {
        /// The message id.
        id: Option<Uuid>,
    },
    /// Not redriven, for this reason.
    Skip(&'static str),
}

/// Decide what redriving a dead letter of `origin` (`relay` or
/// `consumer:<name>`) with message `id` and stored `envelope` does.
pub fn redrive_target<'a>(
    origin: &'a str,
    id: Option<Uuid>,
    envelope: Option<&'a str>,
) -> RedriveTarget<'a> {
    let Some(consumer) = origin.strip_prefix("consumer:") else {
        return RedriveTarget::Relay { id };
    };
    let (Some(id), Some(envelope)) = (id, envelope) else {
        return RedriveTarget::Skip(SKIP_NO_ENVELOPE);
    };
    if serde_json::from_str::<crate::Message>(envelope).is_err() {
        return RedriveTarget::Skip(SKIP_UNREADABLE);
    }
    RedriveTarget::Consumer {
        consumer,
        id,
        envelope,
    }
}

/// The name of an outbox row's stored status code (`0` pending, `1`
/// published, `2` dead), as a status report shows it.
pub fn outbox_status_name(code: i64) -> &'static str {
    match code {
        0 => "pending",
        1 => "published",
        2 => "dead",
        _ => "unknown",
    }
}

/// Whether one of `dead` (a message's dead letters) is consumer
/// `consumer`'s: its inbox row then stands for a failure, not a success.
pub fn dead_at_consumer(dead: &[crate::DeadLetterInfo], consumer: &str) -> bool {
    dead.iter()
        .any(|d| d.origin.strip_prefix("consumer:") == Some(consumer))
}

/// The verdict of a schema check (`check_schema` of each backend), from
/// what the database holds: whether it has custody's tables at all
/// (`tables_present`), the versions recorded in `custody_migrations`
/// (`recorded`), custody's own migrations still recorded in sqlx's
/// `_sqlx_migrations` by a custody older than this one (`legacy`: rows
/// whose version and checksum are custody's), and the versions this build
/// needs (`expected`). `mistake` names what a user mistypes for this backend
/// (`path`, `database name`), `given` what they gave (`path`, `URL`).
/// Recorded versions this build does not know are tolerated (a newer
/// custody's).
pub fn schema_verdict(
    tables_present: bool,
    recorded: &[i64],
    legacy: &[i64],
    expected: impl IntoIterator<Item = i64>,
    mistake: &str,
    given: &str,
) -> Result<()> {
    if !tables_present {
        return Err(Error::Config(format!(
            "this database has no custody tables: it is not a custody database (a mistyped \
             {mistake}?), or custody was never set up in it. Check the {given}; `custody migrate \
             --db …` creates the tables in a database meant to hold them"
        )));
    }
    if !legacy.is_empty() {
        return Err(Error::Config(
            "custody's tables in this database are of an older schema: an earlier custody \
             recorded its migrations in `_sqlx_migrations`, this one keeps them in \
             `custody_migrations`; run `custody migrate --db …` once (it moves custody's rows \
             and applies what is missing, docs/SCHEMA.md)"
                .to_owned(),
        ));
    }
    let missing: Vec<String> = expected
        .into_iter()
        .filter(|v| !recorded.contains(v))
        .map(|v| v.to_string())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::Config(format!(
        "custody's tables in this database are older than this custody (migrations {} not \
         applied); run `custody migrate --db …` first (stop or upgrade the services using it as \
         docs/OPERATIONS.md says)",
        missing.join(", ")
    )))
}

/// One migration [`migrate`] (or a backend's `migrate(&pool)`) applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    /// Its version (the number its file name starts with).
    pub version: i64,
    /// Its description (the rest of its file name, `outbox retention`).
    pub description: String,
}

/// What applying custody's migrations to a database did (each backend's
/// `migrate(&pool)`, `custody migrate`). They are recorded in custody's own
/// table, `custody_migrations` (docs/SCHEMA.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// The migrations applied by this run, in order.
    pub applied: Vec<AppliedMigration>,
    /// How many of this build's migrations were already recorded before
    /// this run applied anything (including the adopted ones).
    pub already: usize,
    /// How many of those were adopted: found in `_sqlx_migrations`, where
    /// custody before its own table recorded them (same version and
    /// checksum), and moved to `custody_migrations`.
    pub adopted: usize,
}

impl MigrationReport {
    /// Whether the database was up to date: nothing had to be applied.
    pub fn up_to_date(&self) -> bool {
        self.applied.is_empty()
    }

    /// How many of this build's migrations the database has now.
    pub fn total(&self) -> usize {
        self.already + self.applied.len()
    }
}

/// How a command opens a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// An existing custody database, as it is: never created, migrated or
    /// written to by the opening (`dlq`, `trace`, `reconcile`). A missing
    /// file or database, or one without custody's current tables, is an
    /// error naming it.
    Existing,
    /// Connect, creating a SQLite file if missing, and migrate (`migrate`,
    /// the relay).
    Migrate,
}

/// Opens a database of one backend: `url` in, a boxed [`Admin`] out.
pub type OpenFn = for<'a> fn(&'a str, Access) -> BoxFuture<'a, Result<Box<dyn Admin>>>;

/// Connects to a database of one backend and applies custody's migrations.
pub type MigrateFn = for<'a> fn(&'a str) -> BoxFuture<'a, Result<MigrationReport>>;

/// One backend's entry in the registry by URL scheme.
#[derive(Debug, Clone, Copy)]
pub struct Driver {
    /// The backend's name (`sqlite`, `postgres`).
    pub name: &'static str,
    /// The URL forms it accepts, for messages (`postgres://user:password@host:port/database`).
    pub forms: &'static [&'static str],
    /// Whether `url` is one of this backend's.
    pub accepts: fn(&str) -> bool,
    /// Open `url` with the given access.
    pub open: OpenFn,
    /// Connect to `url` (a SQLite file is created if missing) and apply
    /// custody's migrations, saying what was done.
    pub migrate: MigrateFn,
}

/// The driver in `drivers` that accepts `url`, or an error naming every
/// accepted form ([`unsupported_url`]).
pub fn driver_for<'d>(drivers: &[&'d Driver], url: &str) -> Result<&'d Driver> {
    drivers
        .iter()
        .copied()
        .find(|d| (d.accepts)(url))
        .ok_or_else(|| {
            let forms: Vec<&str> = drivers
                .iter()
                .flat_map(|d| d.forms.iter().copied())
                .collect();
            unsupported_url(url, &forms)
        })
}

/// The error for a database URL no backend (of `forms`, the URL forms
/// accepted) understands, password hidden. A `mysql://` or `mariadb://` URL
/// is told that backend is not supported yet, so it is not mistaken for a
/// typo. Each driver's own `connect` refuses a foreign `scheme://` with it
/// too, so a URL is never taken for something else (a SQLite file path).
pub fn unsupported_url(url: &str, forms: &[&str]) -> Error {
    let scheme = url
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default();
    let why = if matches!(scheme.as_str(), "mysql" | "mariadb") {
        "MySQL/MariaDB is not supported by custody yet"
    } else {
        "it is not a database URL this custody understands"
    };
    Error::Config(format!(
        "{}: {why}; accepted: {}",
        redact_url(url),
        if forms.is_empty() {
            "none (no backend compiled in)".to_owned()
        } else {
            forms.join(", ")
        }
    ))
}

/// Open `url` with the driver of `drivers` that accepts it.
pub async fn open(drivers: &[&Driver], url: &str, access: Access) -> Result<Box<dyn Admin>> {
    (driver_for(drivers, url)?.open)(url, access).await
}

/// Apply custody's migrations to the database at `url`, with the driver of
/// `drivers` that accepts it (`custody migrate`).
pub async fn migrate(drivers: &[&Driver], url: &str) -> Result<MigrationReport> {
    (driver_for(drivers, url)?.migrate)(url).await
}

/// `url` with its password replaced by `***` and everything else kept, for
/// messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outbox_status_codes() {
        assert_eq!(outbox_status_name(0), "pending");
        assert_eq!(outbox_status_name(1), "published");
        assert_eq!(outbox_status_name(2), "dead");
        assert_eq!(outbox_status_name(7), "unknown");
        assert_eq!(outbox_status_name(-1), "unknown");
    }

    #[test]
    fn a_consumers_own_dead_letter_marks_it_dead() {
        let dead = |origin: &str| crate::DeadLetterInfo {
            origin: origin.to_owned(),
            error: "boom".to_owned(),
            attempts: 1,
            dead_at: DateTime::<Utc>::default(),
        };
        let letters = [dead("relay"), dead("consumer:billing")];
        assert!(dead_at_consumer(&letters, "billing"));
        assert!(!dead_at_consumer(&letters, "shipping"));
        assert!(!dead_at_consumer(&letters, "bill"));
        assert!(!dead_at_consumer(&[dead("relay")], "relay"));
        assert!(!dead_at_consumer(&[], "billing"));
    }

    #[test]
    fn redacts_password_only() {
        assert_eq!(
            redact_url("postgres://app:s3cr@t@db:5432/shop?sslmode=require"),
            "postgres://app:***@db:5432/shop?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/test"),
            "postgres://postgres@127.0.0.1/test"
        );
        assert_eq!(redact_url("nonsense"), "nonsense");
        assert_eq!(redact_url("sqlite://a/b.db"), "sqlite://a/b.db");
    }

    #[test]
    fn schema_verdicts() {
        let no_tables = schema_verdict(false, &[], &[], [1], "path", "path");
        assert!(matches!(no_tables, Err(Error::Config(t)) if t.contains("has no custody tables")));
        let legacy = schema_verdict(true, &[], &[1, 2], [1, 2], "path", "path");
        assert!(
            matches!(legacy, Err(Error::Config(t)) if t.contains("_sqlx_migrations") && t.contains("custody migrate"))
        );
        let old = schema_verdict(true, &[1], &[], [1, 2, 3], "path", "path");
        assert!(matches!(old, Err(Error::Config(t)) if t.contains("migrations 2, 3 not applied")));
        assert!(schema_verdict(true, &[1, 9], &[], [1], "path", "path").is_ok());
    }

    #[test]
    fn migration_report_counts() {
        let mut r = MigrationReport {
            already: 3,
            adopted: 3,
            ..MigrationReport::default()
        };
        assert!(r.up_to_date());
        r.applied.push(AppliedMigration {
            version: 4,
            description: "x".into(),
        });
        assert!(!r.up_to_date());
        assert_eq!(r.total(), 4);
    }

    #[test]
    fn redrive_targets() {
        let id = Uuid::nil();
        assert_eq!(
            redrive_target("relay", Some(id), None),
            RedriveTarget::Relay { id: Some(id) }
        );
        assert_eq!(
            redrive_target("consumer:b", None, None),
            RedriveTarget::Skip(SKIP_NO_ENVELOPE)
        );
        assert_eq!(
            redrive_target("consumer:b", Some(id), Some("{")),
            RedriveTarget::Skip(SKIP_UNREADABLE)
        );
        let msg = crate::Message::builder("t", "k", "T")
            .json(&1)
            .and_then(|b| b.build());
        let Ok(msg) = msg else {
            panic!("message builds")
        };
        let Ok(env) = serde_json::to_string(&msg) else {
            panic!("envelope serializes")
        };
        assert_eq!(
            redrive_target("consumer:b", Some(msg.id), Some(&env)),
            RedriveTarget::Consumer {
                consumer: "b",
                id: msg.id,
                envelope: &env
            }
        );
    }

    #[test]
    fn unknown_scheme_names_the_accepted_forms() {
        fn never(_: &str) -> bool {
            false
        }
        fn open(_: &str, _: Access) -> BoxFuture<'_, Result<Box<dyn Admin>>> {
            Box::pin(async { Err(Error::Config("unused".into())) })
        }
        fn migrate(_: &str) -> BoxFuture<'_, Result<MigrationReport>> {
            Box::pin(async { Err(Error::Config("unused".into())) })
        }
        let d = Driver {
            name: "x",
            forms: &["x://host/db"],
            accepts: never,
            open,
            migrate,
        };
        let Err(e) = driver_for(&[&d], "mysql://u:pw@h/db") else {
            panic!("mysql:// is not accepted")
        };
        let text = e.to_string();
        assert!(text.contains("x://host/db"), "{text}");
        assert!(text.contains("mysql://u:***@h/db"), "{text}");
        assert!(text.contains("MySQL/MariaDB is not supported"), "{text}");
        assert!(!text.contains("pw"), "{text}");
        let Err(e) = driver_for(&[&d], "oracle://h/db") else {
            panic!("oracle:// is not accepted")
        };
        let text = e.to_string();
        assert!(text.contains("not a database URL"), "{text}");
        assert!(!text.contains("MySQL"), "{text}");
    }
}
