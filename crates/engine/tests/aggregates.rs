//! The aggregate repository on the real event stores: upcasting on load,
//! snapshots (every N, snapshot + tail, another schema version ignored, a
//! failing snapshot table), concurrent commands with conflicts retried, a
//! command that keeps conflicting giving up, and idempotent re-runs of a
//! command id. Every scenario runs on SQLite and on PostgreSQL.
//!
//! Conflicts and lost replies are produced by [`Faulty`], a layer around the
//! real store: it holds appends at a barrier until every writer has loaded
//! (so their appends really conflict in the store), has another writer
//! append before each of the repository's appends, or loses the reply of
//! an append that committed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use custody_core::aggregate::{decode_tagged, encode_tagged, Aggregate, DomainEvent};
use custody_core::event::{
    AppendCondition, AppendOutcome, DeleteMode, Direction, EventData, EventStore, ExpectedVersion,
    LogFilter, LogSlice, Query, Snapshot, StreamInfo, StreamMetadata, StreamRead,
};
use custody_core::upcast::{UpcasterBuilder, Upcasters};
use custody_core::{Error, Result};
use custody_engine::repository::{event_id, Outcome, Repository, RepositoryConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::Barrier;
use uuid::Uuid;

// ---------------------------------------------------------------- the domain

/// `Added` is at schema version 3; version 1 stored `{"amount": n}`,
/// version 2 `{"n": n}`, version 3 added `note`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
enum TallyEvent {
    Added { n: i64, note: String },
}

impl DomainEvent for TallyEvent {
    const TYPES: &'static [(&'static str, u32)] = &[("Added", 3)];
    fn event_type(&self) -> &'static str {
        "Added"
    }
    fn to_payload(&self) -> Result<serde_json::Value> {
        encode_tagged(self)
    }
    fn from_payload(event_type: &str, payload: serde_json::Value) -> Result<Self> {
        decode_tagged(event_type, payload)
    }
}

fn upcasters() -> UpcasterBuilder {
    Upcasters::builder()
        .upcast("Added", 1, 2, |mut p| {
            let amount = p["amount"].take();
            Ok(serde_json::json!({ "n": amount }))
        })
        .upcast("Added", 2, 3, |mut p| {
            p["note"] = "before notes".into();
            Ok(p)
        })
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Tally {
    total: i64,
    count: u64,
    notes: BTreeMap<String, u64>,
}

#[derive(Debug)]
struct Add(i64);

#[derive(Debug, PartialEq)]
struct TooMuch {
    total: i64,
    n: i64,
}

impl std::fmt::Display for TooMuch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} + {} is above the cap", self.total, self.n)
    }
}

const CAP: i64 = 1 << 50;

impl Aggregate for Tally {
    const TYPE: &'static str = "tally";
    const SNAPSHOT_VERSION: u32 = 2;
    type Event = TallyEvent;
    type Command = Add;
    type Rejection = TooMuch;

    fn handle(&self, Add(n): &Add) -> std::result::Result<Vec<TallyEvent>, TooMuch> {
        if self.total + n > CAP {
            return Err(TooMuch {
                total: self.total,
                n: *n,
            });
        }
        Ok(vec![TallyEvent::Added {
            n: *n,
            note: "v3".into(),
        }])
    }

    fn apply(&mut self, TallyEvent::Added { n, note }: &TallyEvent) {
        self.total += n;
        self.count += 1;
        *self.notes.entry(note.clone()).or_default() += 1;
    }
}

fn repo<S: EventStore>(store: S, config: RepositoryConfig) -> anyhow::Result<Repository<S, Tally>> {
    Ok(Repository::with_upcasters(store, upcasters())?.config(config))
}

fn fresh_id() -> String {
    Uuid::now_v7().simple().to_string()
}

async fn add<S: EventStore>(r: &Repository<S, Tally>, id: &str, n: i64) -> anyhow::Result<u64> {
    match r.execute(id, Uuid::now_v7(), &Add(n)).await? {
        Outcome::Applied { version, .. } => Ok(version),
        other => anyhow::bail!("Add({n}) on {id}: {other:?}"),
    }
}

async fn stream_len<S: EventStore>(store: &S, stream: &str) -> anyhow::Result<usize> {
    Ok(store
        .read_stream(stream, Direction::Forward, 1, 100_000)
        .await?
        .events
        .len())
}

// ------------------------------------------------------------- the fault layer

#[derive(Default)]
enum Fault {
    #[default]
    None,
    /// The first `n` appends wait until all `n` have arrived.
    Barrier(Arc<Barrier>, AtomicUsize, usize),
    /// Before each append, another writer appends an `Added` to the stream.
    Compete,
    /// The next append commits, then its reply is lost (a retryable error).
    LoseReply(AtomicBool),
}

#[derive(Clone)]
struct Faulty<S> {
    inner: S,
    fault: Arc<Fault>,
}

impl<S: EventStore> Faulty<S> {
    fn new(inner: S, fault: Fault) -> Self {
        Faulty {
            inner,
            fault: Arc::new(fault),
        }
    }
}

impl<S: EventStore> EventStore for Faulty<S> {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendOutcome> {
        match &*self.fault {
            Fault::None => {}
            Fault::Barrier(barrier, seen, n) => {
                if seen.fetch_add(1, Ordering::SeqCst) < *n {
                    barrier.wait().await;
                }
            }
            Fault::Compete => {
                let other = EventData::json(
                    "Added",
                    &serde_json::json!({ "n": 1, "note": "other writer" }),
                )?
                .schema_version(3);
                self.inner
                    .append(stream, ExpectedVersion::Any, vec![other])
                    .await?;
            }
            Fault::LoseReply(lose) => {
                if lose.swap(false, Ordering::SeqCst) {
                    let outcome = self.inner.append(stream, expected, events).await?;
                    assert!(
                        outcome.appended().is_some(),
                        "the append whose reply is lost must commit: {outcome:?}"
                    );
                    return Err(Error::store(
                        "test",
                        "append events",
                        true,
                        "connection reset after commit (reply lost)",
                    ));
                }
            }
        }
        self.inner.append(stream, expected, events).await
    }
    async fn append_if(
        &self,
        stream: &str,
        condition: &AppendCondition,
        events: Vec<EventData>,
    ) -> Result<AppendOutcome> {
        self.inner.append_if(stream, condition, events).await
    }
    async fn read_stream(
        &self,
        stream: &str,
        direction: Direction,
        from: u64,
        limit: usize,
    ) -> Result<StreamRead> {
        self.inner.read_stream(stream, direction, from, limit).await
    }
    async fn read_all(&self, after: u64, filter: &LogFilter, limit: usize) -> Result<LogSlice> {
        self.inner.read_all(after, filter, limit).await
    }
    async fn read_query(&self, query: &Query, after: u64, limit: usize) -> Result<LogSlice> {
        self.inner.read_query(query, after, limit).await
    }
    async fn head(&self) -> Result<u64> {
        self.inner.head().await
    }
    async fn wait_for_head(&self, after: u64, timeout: Duration) -> Result<u64> {
        self.inner.wait_for_head(after, timeout).await
    }
    async fn stream_info(&self, stream: &str) -> Result<Option<StreamInfo>> {
        self.inner.stream_info(stream).await
    }
    async fn set_metadata(&self, stream: &str, metadata: &StreamMetadata) -> Result<()> {
        self.inner.set_metadata(stream, metadata).await
    }
    async fn delete_stream(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        mode: DeleteMode,
    ) -> Result<AppendOutcome> {
        self.inner.delete_stream(stream, expected, mode).await
    }
    async fn streams(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StreamInfo>> {
        self.inner.streams(prefix, after, limit).await
    }
    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        self.inner.save_snapshot(snapshot).await
    }
    async fn load_snapshot(&self, stream: &str, aggregate: &str) -> Result<Option<Snapshot>> {
        self.inner.load_snapshot(stream, aggregate).await
    }
}

// ---------------------------------------------------------------- backends

trait Backend: Sized {
    type Store: EventStore;
    async fn fresh() -> anyhow::Result<Option<Self>>;
    fn store(&self) -> Self::Store;
    /// Make every snapshot read and write fail for real.
    async fn break_snapshots(&self) -> anyhow::Result<()>;
}

struct Sqlite {
    _dir: tempfile::TempDir,
    pool: sqlx::SqlitePool,
    store: custody_sqlite::SqliteEventStore,
}

impl Backend for Sqlite {
    type Store = custody_sqlite::SqliteEventStore;
    async fn fresh() -> anyhow::Result<Option<Self>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("custody.db").to_string_lossy().into_owned();
        let pool = custody_sqlite::connect(&path).await?;
        custody_sqlite::migrate(&pool).await?;
        Ok(Some(Sqlite {
            store: custody_sqlite::SqliteEventStore::new(pool.clone()),
            pool,
            _dir: dir,
        }))
    }
    fn store(&self) -> Self::Store {
        self.store.clone()
    }
    async fn break_snapshots(&self) -> anyhow::Result<()> {
        sqlx::query("DROP TABLE custody_event_snapshots")
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

struct Postgres {
    _db: custody_testkit::PgTestDb,
    pool: sqlx::PgPool,
    store: custody_postgres::PgEventStore,
}

impl Backend for Postgres {
    type Store = custody_postgres::PgEventStore;
    async fn fresh() -> anyhow::Result<Option<Self>> {
        let Some(db) = custody_testkit::postgres_db().await? else {
            return Ok(None);
        };
        let pool = custody_postgres::connect(&db.url).await?;
        custody_postgres::migrate(&pool).await?;
        Ok(Some(Postgres {
            store: custody_postgres::PgEventStore::new(pool.clone()),
            pool,
            _db: db,
        }))
    }
    fn store(&self) -> Self::Store {
        self.store.clone()
    }
    async fn break_snapshots(&self) -> anyhow::Result<()> {
        sqlx::query("DROP TABLE custody_event_snapshots")
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

macro_rules! on_backends {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() -> anyhow::Result<()> {
                    let Some(b) = <super::Sqlite as super::Backend>::fresh().await? else {
                        return Ok(());
                    };
                    super::$scenario(b).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() -> anyhow::Result<()> {
                    let Some(b) = <super::Postgres as super::Backend>::fresh().await? else {
                        return Ok(());
                    };
                    super::$scenario(b).await
                }
            )*
        }
    };
}

on_backends!(
    upcasters_bring_v1_and_v2_events_up_to_v3_on_load,
    snapshot_every_n_then_load_reads_only_the_tail,
    snapshot_of_another_schema_version_is_ignored_never_misread,
    failing_snapshots_never_fail_a_command,
    eight_concurrent_writers_each_command_applied_once,
    a_command_that_keeps_conflicting_gives_up,
    same_command_id_twice_is_idempotent,
    a_rerun_after_a_lost_reply_appends_nothing,
    a_rerun_below_a_snapshot_is_still_recognised,
    rejections_and_tombstones_are_outcomes,
);

// ---------------------------------------------------------------- scenarios

async fn upcasters_bring_v1_and_v2_events_up_to_v3_on_load<B: Backend>(b: B) -> anyhow::Result<()> {
    let store = b.store();
    let id = fresh_id();
    let stream = format!("tally-{id}");
    // what an older build wrote
    let old = vec![
        EventData::json("Added", &serde_json::json!({ "amount": 5 }))?.schema_version(1),
        EventData::json("Added", &serde_json::json!({ "amount": 7 }))?.schema_version(1),
        EventData::json("Added", &serde_json::json!({ "n": 11 }))?.schema_version(2),
    ];
    let outcome = store
        .append(&stream, ExpectedVersion::NoStream, old)
        .await?;
    anyhow::ensure!(outcome.appended().is_some(), "{outcome:?}");

    let r = repo(store.clone(), RepositoryConfig::default())?;
    let loaded = r.load(&id).await?;
    assert_eq!(loaded.version, 3);
    assert_eq!(loaded.state.total, 23);
    assert_eq!(
        loaded.state.notes,
        BTreeMap::from([("before notes".to_owned(), 3)]),
        "every old event was read in its v3 shape"
    );
    // new events are written at v3 next to the old ones
    add(&r, &id, 100).await?;
    let read = store
        .read_stream(&stream, Direction::Forward, 1, 10)
        .await?;
    let versions: Vec<u32> = read.events.iter().map(|e| e.schema_version).collect();
    assert_eq!(versions, [1, 1, 2, 3], "stored events are never rewritten");
    let loaded = r.load(&id).await?;
    assert_eq!(loaded.state.total, 123);
    assert_eq!(loaded.state.notes.get("v3"), Some(&1));

    // without the chain, the repository refuses to start (gap at version 1)
    let err = Repository::<_, Tally>::new(store.clone())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("no upcaster for Added from version 1") && err.contains("tally aggregate"),
        "{err}"
    );
    // a half chain is refused too, naming the missing version
    let half = Upcasters::builder().upcast("Added", 1, 2, Ok);
    let err = Repository::<_, Tally>::with_upcasters(store, half)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("register an upcaster for Added from version 2 (to version 3)"),
        "{err}"
    );
    Ok(())
}

async fn snapshot_every_n_then_load_reads_only_the_tail<B: Backend>(b: B) -> anyhow::Result<()> {
    let store = b.store();
    let r = repo(store.clone(), RepositoryConfig::default().snapshot_every(5))?;
    let id = fresh_id();
    let stream = format!("tally-{id}");
    for n in 1..=12 {
        add(&r, &id, n).await?;
    }
    let snapshot = store
        .load_snapshot(&stream, "tally")
        .await?
        .ok_or_else(|| anyhow::anyhow!("no snapshot after 12 events with snapshot_every 5"))?;
    assert_eq!(snapshot.version, 10, "the last multiple of 5 crossed");
    assert_eq!(snapshot.schema_version, 2, "Tally::SNAPSHOT_VERSION");

    let loaded = r.load(&id).await?;
    assert_eq!(loaded.snapshot_version, Some(10));
    assert_eq!(loaded.events_read, 2, "only the tail after the snapshot");
    assert_eq!(loaded.version, 12);
    assert_eq!(loaded.state.total, (1..=12).sum::<i64>());
    assert_eq!(loaded.state.count, 12);

    // one append crossing two multiples (10 → 12 with every = 1) snapshots once at its end
    let every_one = repo(store.clone(), RepositoryConfig::default().snapshot_every(1))?;
    add(&every_one, &id, 1).await?;
    let snapshot = store.load_snapshot(&stream, "tally").await?;
    assert_eq!(snapshot.map(|s| s.version), Some(13));
    let loaded = r.load(&id).await?;
    assert_eq!((loaded.snapshot_version, loaded.events_read), (Some(13), 0));
    assert_eq!(loaded.state.total, (1..=12).sum::<i64>() + 1);
    Ok(())
}

async fn snapshot_of_another_schema_version_is_ignored_never_misread<B: Backend>(
    b: B,
) -> anyhow::Result<()> {
    let store = b.store();
    let r = repo(store.clone(), RepositoryConfig::default().snapshot_every(5))?;
    let id = fresh_id();
    let stream = format!("tally-{id}");
    for n in 1..=6 {
        add(&r, &id, n).await?;
    }
    // A snapshot that decodes fine as a Tally but is of schema version 1,
    // with other meanings: read as the current version it would be wrong.
    let misleading = Tally {
        total: 999_999,
        count: 6,
        notes: BTreeMap::new(),
    };
    store
        .save_snapshot(&Snapshot {
            stream: stream.clone(),
            aggregate: "tally".into(),
            schema_version: 1,
            version: 6,
            state: serde_json::to_vec(&misleading)?,
            taken_at: chrono::Utc::now(),
        })
        .await?;
    let loaded = r.load(&id).await?;
    assert_eq!(loaded.snapshot_version, None, "the v1 snapshot is ignored");
    assert_eq!(loaded.events_read, 6, "folded from the first event");
    assert_eq!(loaded.state.total, 21);

    // the current schema version but not decodable: ignored as well
    store
        .save_snapshot(&Snapshot {
            stream: stream.clone(),
            aggregate: "tally".into(),
            schema_version: 2,
            version: 6,
            state: br#"{"total": "lots"}"#.to_vec(),
            taken_at: chrono::Utc::now(),
        })
        .await?;
    let loaded = r.load(&id).await?;
    assert_eq!((loaded.snapshot_version, loaded.state.total), (None, 21));

    // a snapshot ahead of its stream (version 50 of a stream at 6) would
    // make every append conflict: ignored too, and commands still apply
    store
        .save_snapshot(&Snapshot {
            stream: stream.clone(),
            aggregate: "tally".into(),
            schema_version: 2,
            version: 50,
            state: serde_json::to_vec(&misleading)?,
            taken_at: chrono::Utc::now(),
        })
        .await?;
    let loaded = r.load(&id).await?;
    assert_eq!((loaded.snapshot_version, loaded.version), (None, 6));
    assert_eq!(loaded.state.total, 21);

    // the next snapshot replaces it
    for n in 7..=10 {
        add(&r, &id, n).await?;
    }
    let loaded = r.load(&id).await?;
    assert_eq!(loaded.snapshot_version, Some(10));
    assert_eq!(loaded.state.total, 55);
    Ok(())
}

async fn failing_snapshots_never_fail_a_command<B: Backend>(b: B) -> anyhow::Result<()> {
    let store = b.store();
    let r = repo(store.clone(), RepositoryConfig::default().snapshot_every(2))?;
    let id = fresh_id();
    add(&r, &id, 1).await?;
    b.break_snapshots().await?;
    // the store really fails now
    let direct = store.load_snapshot(&format!("tally-{id}"), "tally").await;
    assert!(direct.is_err(), "snapshots should be broken: {direct:?}");
    // crossing 2 and 4 tries to snapshot; the commands are applied anyway
    for n in 2..=5 {
        add(&r, &id, n).await?;
    }
    let loaded = r.load(&id).await?;
    assert_eq!((loaded.version, loaded.state.total), (5, 15));
    assert_eq!(loaded.snapshot_version, None);
    Ok(())
}

async fn eight_concurrent_writers_each_command_applied_once<B: Backend>(
    b: B,
) -> anyhow::Result<()> {
    const WRITERS: usize = 8;
    const EACH: i64 = 5;
    // Every writer's first append waits until all eight have loaded the
    // empty aggregate: seven of those appends must conflict in the store.
    let store = Faulty::new(
        b.store(),
        Fault::Barrier(
            Arc::new(Barrier::new(WRITERS)),
            AtomicUsize::new(0),
            WRITERS,
        ),
    );
    // A writer's attempt fails only when another command got in first: at
    // most 7 × 5 others, so this bound is never reached.
    let r = repo(
        store.clone(),
        RepositoryConfig::default().max_conflict_retries(64),
    )?;
    let id = fresh_id();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS as i64 {
        let r = r.clone();
        let id = id.clone();
        tasks.spawn(async move {
            let mut conflicts = 0;
            for k in 0..EACH {
                // distinct amounts: the final total says which were applied
                let n = 1 << (w * EACH + k);
                match r.execute(&id, Uuid::now_v7(), &Add(n)).await? {
                    Outcome::Applied {
                        conflicts: c,
                        idempotent: false,
                        ..
                    } => conflicts += c,
                    other => anyhow::bail!("writer {w} command {k}: {other:?}"),
                }
            }
            anyhow::Ok(conflicts)
        });
    }
    let mut conflicts = 0;
    while let Some(done) = tasks.join_next().await {
        conflicts += done??;
    }
    let loaded = r.load(&id).await?;
    let all = (1i64 << (WRITERS as i64 * EACH)) - 1;
    assert_eq!(
        loaded.state.total, all,
        "every command applied exactly once (bits: {:b})",
        loaded.state.total
    );
    assert_eq!(loaded.version, WRITERS as u64 * EACH as u64);
    assert_eq!(
        stream_len(&store, &format!("tally-{id}")).await?,
        WRITERS * EACH as usize
    );
    assert!(
        conflicts >= (WRITERS - 1) as u32,
        "the first appends of 8 writers that all loaded version 0 conflict at least 7 times, retried: {conflicts}"
    );
    Ok(())
}

async fn a_command_that_keeps_conflicting_gives_up<B: Backend>(b: B) -> anyhow::Result<()> {
    let store = Faulty::new(b.store(), Fault::Compete);
    let r = repo(
        store.clone(),
        RepositoryConfig::default().max_conflict_retries(3),
    )?;
    let id = fresh_id();
    let outcome = r.execute(&id, Uuid::now_v7(), &Add(1000)).await?;
    match outcome {
        Outcome::GaveUp { attempts, actual } => {
            assert_eq!(attempts, 4, "the first attempt and 3 retries");
            assert_eq!(
                actual,
                Some(4),
                "another writer appended before each attempt"
            );
        }
        other => anyhow::bail!("expected GaveUp, got {other:?}"),
    }
    let loaded = r.load(&id).await?;
    assert_eq!(
        loaded.state.total, 4,
        "only the other writer's events, never the command's"
    );
    Ok(())
}

async fn same_command_id_twice_is_idempotent<B: Backend>(b: B) -> anyhow::Result<()> {
    let store = b.store();
    let r = repo(store.clone(), RepositoryConfig::default())?;
    let id = fresh_id();
    let stream = format!("tally-{id}");
    add(&r, &id, 1).await?;
    let command = Uuid::now_v7();
    let request = BTreeMap::from([("correlationid".to_owned(), "req-1".to_owned())]);
    let first = r.execute_with(&id, command, &Add(10), &request).await?;
    let Outcome::Applied {
        events,
        first_version,
        version,
        idempotent: false,
        ..
    } = first
    else {
        anyhow::bail!("first run: {first:?}");
    };
    assert_eq!((first_version, version), (2, 2));
    let second = r.execute(&id, command, &Add(10)).await?;
    match second {
        Outcome::Applied {
            events: again,
            first_version: f,
            version: v,
            idempotent,
            ..
        } => {
            assert!(idempotent, "the second run is recognised");
            assert_eq!((f, v), (2, 2));
            assert_eq!(again, events);
        }
        other => anyhow::bail!("second run: {other:?}"),
    }
    assert_eq!(stream_len(&store, &stream).await?, 2, "one set of events");
    let read = store.read_stream(&stream, Direction::Forward, 2, 1).await?;
    assert_eq!(read.events[0].id, event_id(command, 0));
    assert_eq!(
        read.events[0]
            .headers
            .get("causationid")
            .map(String::as_str),
        Some(command.to_string().as_str())
    );
    assert_eq!(
        read.events[0]
            .headers
            .get("correlationid")
            .map(String::as_str),
        Some("req-1")
    );
    // a header name no message could carry is refused before anything is appended
    let bad = BTreeMap::from([("Not A Header".to_owned(), "x".to_owned())]);
    let err = r
        .execute_with(&id, Uuid::now_v7(), &Add(1), &bad)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("Not A Header"), "{err}");
    assert_eq!(stream_len(&store, &stream).await?, 2);
    // a command id that is not a UUIDv7 is refused before anything happens
    let err = r
        .execute(&id, Uuid::from_u128(42), &Add(1))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("is not a UUIDv7"), "{err}");
    Ok(())
}

async fn a_rerun_after_a_lost_reply_appends_nothing<B: Backend>(b: B) -> anyhow::Result<()> {
    let store = Faulty::new(b.store(), Fault::LoseReply(AtomicBool::new(true)));
    let r = repo(store.clone(), RepositoryConfig::default())?;
    let id = fresh_id();
    let command = Uuid::now_v7();
    let lost = r.execute(&id, command, &Add(7)).await;
    let err = lost
        .err()
        .ok_or_else(|| anyhow::anyhow!("the reply should have been lost"))?;
    assert!(err.retryable(), "{err}");
    // the client retries the same command
    let again = r.execute(&id, command, &Add(7)).await?;
    assert!(
        matches!(
            again,
            Outcome::Applied {
                idempotent: true,
                version: 1,
                ..
            }
        ),
        "{again:?}"
    );
    let loaded = r.load(&id).await?;
    assert_eq!((loaded.version, loaded.state.total), (1, 7), "applied once");
    Ok(())
}

async fn a_rerun_below_a_snapshot_is_still_recognised<B: Backend>(b: B) -> anyhow::Result<()> {
    let store = b.store();
    let r = repo(
        store.clone(),
        RepositoryConfig::default().snapshot_every(1).read_page(2),
    )?;
    let id = fresh_id();
    let command = Uuid::now_v7();
    add(&r, &id, 1).await?;
    assert!(r.execute(&id, command, &Add(10)).await?.applied().is_some());
    for n in 0..6 {
        add(&r, &id, 100 + n).await?;
    }
    // the load starts from the snapshot at 8: the command's event (version
    // 2) is not in the tail; its re-run must still not apply it again
    assert_eq!(r.load(&id).await?.snapshot_version, Some(8));
    let again = r.execute(&id, command, &Add(10)).await?;
    assert!(
        matches!(
            again,
            Outcome::Applied {
                idempotent: true,
                first_version: 2,
                version: 2,
                ..
            }
        ),
        "{again:?}"
    );
    let loaded = r.load(&id).await?;
    assert_eq!(loaded.version, 8);
    assert_eq!(loaded.state.total, 1 + 10 + (100..106).sum::<i64>());
    Ok(())
}

async fn rejections_and_tombstones_are_outcomes<B: Backend>(b: B) -> anyhow::Result<()> {
    let store = b.store();
    let r = repo(store.clone(), RepositoryConfig::default())?;
    let id = fresh_id();
    add(&r, &id, CAP - 1).await?;
    match r.execute(&id, Uuid::now_v7(), &Add(2)).await? {
        Outcome::Rejected(TooMuch { total, n }) => assert_eq!((total, n), (CAP - 1, 2)),
        other => anyhow::bail!("expected a rejection, got {other:?}"),
    }
    assert_eq!(r.load(&id).await?.version, 1, "a rejection appends nothing");

    let deleted = store
        .delete_stream(
            &format!("tally-{id}"),
            ExpectedVersion::Any,
            DeleteMode::Tombstone,
        )
        .await?;
    anyhow::ensure!(deleted.appended().is_some(), "{deleted:?}");
    let outcome = r.execute(&id, Uuid::now_v7(), &Add(1)).await?;
    assert!(matches!(outcome, Outcome::Tombstoned), "{outcome:?}");
    Ok(())
}
