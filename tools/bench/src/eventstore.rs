//! `eventstore`: the event store on SQLite and on PostgreSQL, each figure
//! against a ceiling measured in the same run on the same table:
//!
//! - single-event appends: 1 writer against a raw single-row INSERT +
//!   COMMIT into `custody_events`; `--producers` concurrent writers with
//!   write combining on and off against the 1-writer rate (target ≥ 5×);
//! - batched appends (1,000 events per append): SQLite against raw
//!   multi-row INSERTs into `custody_events` in one transaction (target ≥
//!   200,000 events/s), PostgreSQL against COPY into `custody_events`, one
//!   COPY per 1,000 rows (target ≥ 0.7×);
//! - stream reads (the batched streams, 1,000 events each) and the catch-up
//!   read of the whole global log in pages of 1,000, against a raw SELECT of
//!   the same rows (SQLite catch-up target ≥ 500,000 events/s);
//! - the workload peers are compared on: 1,000 aggregates × 20 events, each
//!   event its own command (load the stream, decide, append with `Exact`),
//!   then every aggregate read back, at the durability setting printed.
//!
//! Raw ceiling rows are deleted after each ceiling, so the log the readers
//! measure holds only what the store appended.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use custody::event::{AppendOutcome, Direction, EventData, EventStore, ExpectedVersion, LogFilter};
use custody::postgres::PgEventStore;
use custody::sqlite::SqliteEventStore;
use hdrhistogram::Histogram;
use sqlx::{PgPool, Row, SqlitePool};
use tokio::time::Instant;
use uuid::Uuid;

use custody_scenario::services::{run_tag, with_databases};

use super::cpu::CpuMeter;
use super::{bar, drive, new_histogram, pg_pool, warm_up, BenchArgs, Latency, Report, Target};

/// Events per append in the batched phase, rows per COPY in its ceiling.
const BATCH: usize = 1000;
/// Events per read call (stream reads and the catch-up).
const PAGE: usize = 1000;
/// Rows per statement of the SQLite raw ceiling (10 columns: 1,000
/// parameters, well inside SQLite's limit).
const RAW_ROWS: usize = 100;
/// Streams the single-event appends are spread over.
const SINGLE_STREAMS: u64 = 1000;
/// Events per aggregate in the workload.
const PER_AGGREGATE: u64 = 20;
/// How often a command is retried after a conflict before the run fails.
const RETRIES: u32 = 10;

/// Sizes of one run.
struct Sizes {
    /// Single-event appends of 1 writer.
    single: u64,
    /// Single-event appends of the concurrent writers (each setting).
    concurrent: u64,
    /// Batched appends (of [`BATCH`] events each), SQLite.
    sqlite_batches: u64,
    /// Batched appends, PostgreSQL.
    pg_batches: u64,
    /// Aggregates of the workload.
    aggregates: u64,
}

impl Sizes {
    fn of(args: &BenchArgs) -> Sizes {
        if args.quick {
            Sizes {
                single: 300,
                concurrent: 2000,
                sqlite_batches: 100,
                pg_batches: 50,
                aggregates: 250,
            }
        } else {
            Sizes {
                single: 2000,
                concurrent: 20_000,
                sqlite_batches: 1000,
                pg_batches: 300,
                aggregates: 1000,
            }
        }
    }
}

pub async fn run(args: &BenchArgs, report: &mut Report) -> anyhow::Result<()> {
    let sizes = Sizes::of(args);
    report.param("writers", args.producers);
    report.param("single_appends_1_writer", sizes.single);
    report.param("single_appends_concurrent", sizes.concurrent);
    report.param("batch_events", BATCH);
    report.param("sqlite_batches", sizes.sqlite_batches);
    report.param("postgres_batches", sizes.pg_batches);
    report.param("read_page", PAGE);
    report.param(
        "workload",
        format!(
            "{} aggregates x {PER_AGGREGATE} events, one command per event",
            sizes.aggregates
        ),
    );
    let payload: Arc<[u8]> = vec![b'x'; args.payload_bytes].into();
    sqlite(args, report, &sizes, &payload).await?;
    let tag = run_tag();
    let names = [format!("custody_bench_{tag}_es")];
    with_databases(&args.postgres, &names, |urls| async move {
        postgres(args, report, &sizes, &payload, &urls[0]).await
    })
    .await
}

// ---------------------------------------------------------------------------
// SQLite

/// A temporary directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const SQLITE_INSERT_ONE: &str = "INSERT INTO custody_events (stream, version, id, event_type, \
     schema_version, content_type, payload, headers, tags, recorded_at) \
     VALUES (?1, ?2, ?3, 'BenchEvent', 1, 'application/octet-stream', ?4, NULL, NULL, ?5)";

async fn sqlite(
    args: &BenchArgs,
    report: &mut Report,
    sizes: &Sizes,
    payload: &Arc<[u8]>,
) -> anyhow::Result<()> {
    let dir = TempDir(std::env::temp_dir().join(format!("custody-bench-es-{}", run_tag())));
    std::fs::create_dir_all(&dir.0)?;
    let path = dir.0.join("events.db").to_string_lossy().into_owned();
    let pool = custody::sqlite::connect(&path).await?;
    custody::sqlite::migrate(&pool).await?;
    let durability = "SQLite WAL, synchronous=FULL (custody's default)";
    report.param("sqlite", durability);
    let w = args.producers;

    // single-event appends against a raw single-row INSERT + COMMIT
    let raw_one = {
        let (pool, payload) = (pool.clone(), payload.clone());
        move |i: u64| {
            let (pool, payload) = (pool.clone(), payload.clone());
            async move {
                let mut tx = pool.begin().await?;
                sqlx::query(SQLITE_INSERT_ONE)
                    .bind(format!("raw1-{i}"))
                    .bind(1i64)
                    .bind(Uuid::now_v7().as_bytes().to_vec())
                    .bind(&payload[..])
                    .bind(chrono::Utc::now().timestamp_millis())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }
        }
    };
    let raw1 = rate_of(
        report,
        1,
        sizes.single,
        sizes.single,
        "SQLite ceiling: raw INSERT + COMMIT of one event row, 1 writer",
        raw_one,
    )
    .await?;
    sqlx::query("DELETE FROM custody_events WHERE stream LIKE 'raw1-%'")
        .execute(&pool)
        .await?;

    let store = SqliteEventStore::new(pool.clone());
    let one = single_appends(
        report,
        store.clone(),
        1,
        sizes.single,
        "SQLite",
        "s1",
        payload,
    )
    .await?;
    let on = single_appends(
        report,
        store.clone(),
        w,
        sizes.concurrent,
        "SQLite",
        "s8on",
        payload,
    )
    .await?;
    let stats = store.write_stats();
    report.param(
        "sqlite_write_combining",
        format!(
            "{} appends in {} transactions, largest {}",
            stats.writes, stats.transactions, stats.largest_batch
        ),
    );
    let off = single_appends(
        report,
        SqliteEventStore::new(pool.clone()).with_write_combining(false),
        w,
        sizes.concurrent,
        "SQLite",
        "s8off",
        payload,
    )
    .await?;
    report.compare(
        "SQLite single-event appends, 1 writer",
        one,
        "events/s",
        Some(("raw INSERT+COMMIT, 1 writer", raw1)),
        None,
    );
    report.compare(
        &format!("SQLite single-event appends, {w} writers, combining on"),
        on,
        "events/s",
        Some(("1 writer", one)),
        Some(Target::RatioAtLeast(5.0)),
    );
    report.compare(
        &format!("SQLite single-event appends, {w} writers, combining off"),
        off,
        "events/s",
        Some(("1 writer", one)),
        None,
    );

    // batched appends against raw multi-row INSERTs in one transaction
    let events = sizes.sqlite_batches * BATCH as u64;
    let b = bar(events, "SQLite ceiling: raw INSERTs, one transaction");
    let meter = CpuMeter::start();
    let took = sqlite_raw_batch(&pool, events, payload, &b).await?;
    b.finish_and_clear();
    let name = "SQLite ceiling: raw multi-row INSERTs into custody_events, one transaction";
    report.cpu(name, meter.stop(), events);
    let raw_batch = report.rate(name, events, took);
    sqlx::query("DELETE FROM custody_events WHERE stream LIKE 'rawb-%'")
        .execute(&pool)
        .await?;
    let batched = batched_appends(report, &store, sizes.sqlite_batches, "SQLite", payload).await?;
    report.compare(
        &format!("SQLite batched appends ({BATCH} per append)"),
        batched,
        "events/s",
        Some(("raw INSERTs, one tx", raw_batch)),
        None,
    );
    report.compare(
        &format!("SQLite batched appends ({BATCH} per append)"),
        batched,
        "events/s",
        None,
        Some(Target::RateAtLeast(200_000.0)),
    );

    // reads
    let raw_stream = {
        let pool = pool.clone();
        move |stream: String| {
            let pool = pool.clone();
            async move {
                let rows = sqlx::query(
                    "SELECT position, stream, version, id, event_type, schema_version, content_type, \
                     payload, headers, tags, recorded_at FROM custody_events WHERE stream = ?1 \
                     ORDER BY version",
                )
                .bind(stream)
                .fetch_all(&pool)
                .await?;
                decode_sqlite(&rows)
            }
        }
    };
    reads(report, &store, sizes.sqlite_batches, "SQLite", raw_stream).await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM custody_events")
        .fetch_one(&pool)
        .await?;
    let raw_all = {
        let pool = pool.clone();
        async move {
            let rows = sqlx::query(
                "SELECT position, stream, version, id, event_type, schema_version, content_type, \
                 payload, headers, tags, recorded_at FROM custody_events ORDER BY position",
            )
            .fetch_all(&pool)
            .await?;
            decode_sqlite(&rows)
        }
    };
    let catch = catch_up(report, &store, u64::try_from(total)?, "SQLite", raw_all).await?;
    report.compare(
        "SQLite catch-up read of the global log",
        catch,
        "events/s",
        None,
        Some(Target::RateAtLeast(500_000.0)),
    );

    aggregates(report, &store, sizes.aggregates, w, "SQLite", durability).await?;
    drop(store);
    pool.close().await;
    Ok(())
}

/// Insert `events` rows with multi-row INSERTs of [`RAW_ROWS`] rows, all in
/// one transaction.
async fn sqlite_raw_batch(
    pool: &SqlitePool,
    events: u64,
    payload: &[u8],
    b: &indicatif::ProgressBar,
) -> anyhow::Result<Duration> {
    let mut sql = String::from(
        "INSERT INTO custody_events (stream, version, id, event_type, schema_version, \
         content_type, payload, headers, tags, recorded_at) VALUES ",
    );
    for r in 0..RAW_ROWS {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push_str("(?, ?, ?, 'BenchEvent', 1, 'application/octet-stream', ?, NULL, NULL, ?)");
    }
    let start = Instant::now();
    let mut tx = pool.begin().await?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut done = 0u64;
    while done < events {
        let mut q = sqlx::query(&sql);
        for r in 0..RAW_ROWS as u64 {
            let i = done + r;
            q = q
                .bind(format!("rawb-{}", i / BATCH as u64))
                .bind(i64::try_from(i % BATCH as u64 + 1)?)
                .bind(Uuid::now_v7().as_bytes().to_vec())
                .bind(payload)
                .bind(now);
        }
        q.execute(&mut *tx).await?;
        done += RAW_ROWS as u64;
        b.set_position(done);
    }
    tx.commit().await?;
    Ok(start.elapsed())
}

/// Decode rows as a reader must (every column), returning how many.
fn decode_sqlite(rows: &[sqlx::sqlite::SqliteRow]) -> anyhow::Result<u64> {
    let mut bytes = 0usize;
    for r in rows {
        let _: i64 = r.try_get(0)?;
        let stream: String = r.try_get(1)?;
        let _: i64 = r.try_get(2)?;
        let id: Vec<u8> = r.try_get(3)?;
        let t: String = r.try_get(4)?;
        let _: i64 = r.try_get(5)?;
        let ct: String = r.try_get(6)?;
        let payload: Vec<u8> = r.try_get(7)?;
        let _: Option<String> = r.try_get(8)?;
        let _: Option<String> = r.try_get(9)?;
        let _: i64 = r.try_get(10)?;
        bytes += stream.len() + id.len() + t.len() + ct.len() + payload.len();
    }
    std::hint::black_box(bytes);
    Ok(rows.len() as u64)
}

// ---------------------------------------------------------------------------
// PostgreSQL

/// The columns COPY and the raw single-row INSERT write.
const PG_COLUMNS: &str = "tx, ordinal, stream, version, id, event_type, schema_version, \
     content_type, payload, headers, tags, recorded_at";

async fn postgres(
    args: &BenchArgs,
    report: &mut Report,
    sizes: &Sizes,
    payload: &Arc<[u8]>,
    url: &str,
) -> anyhow::Result<()> {
    let w = args.producers;
    let pool = pg_pool(url, u32::try_from(w).unwrap_or(u32::MAX).saturating_add(4)).await?;
    custody::postgres::migrate(&pool).await?;
    let sync: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&pool)
        .await?;
    let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(&pool).await?;
    let durability = format!("PostgreSQL synchronous_commit={sync}, fsync={fsync}");
    report.param("postgres", durability.clone());

    // Raw rows take negative tx numbers: the store's sequence only hands out
    // positive ones and no pending row names them, so they never join the
    // log; they are deleted after each ceiling.
    let raw_one = {
        let (pool, payload) = (pool.clone(), payload.clone());
        move |i: u64| {
            let (pool, payload) = (pool.clone(), payload.clone());
            async move {
                sqlx::query(&format!(
                    "INSERT INTO custody_events ({PG_COLUMNS}) VALUES \
                     ($1, 0, $2, 1, $3, 'BenchEvent', 1, 'application/octet-stream', $4, '{{}}', '{{}}', now())"
                ))
                .bind(-1 - i64::try_from(i)?)
                .bind(format!("raw1-{i}"))
                .bind(Uuid::now_v7())
                .bind(&payload[..])
                .execute(&pool)
                .await?;
                Ok(())
            }
        }
    };
    let raw1 = rate_of(
        report,
        1,
        sizes.single,
        sizes.single,
        "PostgreSQL ceiling: raw INSERT (autocommit) of one event row, 1 writer",
        raw_one,
    )
    .await?;
    sqlx::query("DELETE FROM custody_events WHERE tx < 0")
        .execute(&pool)
        .await?;

    let store = PgEventStore::new(pool.clone());
    let one = single_appends(
        report,
        store.clone(),
        1,
        sizes.single,
        "PostgreSQL",
        "s1",
        payload,
    )
    .await?;
    let on = single_appends(
        report,
        store.clone(),
        w,
        sizes.concurrent,
        "PostgreSQL",
        "s8on",
        payload,
    )
    .await?;
    let stats = store.write_stats();
    report.param(
        "postgres_write_combining",
        format!(
            "{} appends in {} transactions, largest {}",
            stats.writes, stats.transactions, stats.largest_batch
        ),
    );
    let off = single_appends(
        report,
        PgEventStore::new(pool.clone()).with_write_combining(false),
        w,
        sizes.concurrent,
        "PostgreSQL",
        "s8off",
        payload,
    )
    .await?;
    report.compare(
        "PostgreSQL single-event appends, 1 writer",
        one,
        "events/s",
        Some(("raw INSERT, 1 writer", raw1)),
        None,
    );
    report.compare(
        &format!("PostgreSQL single-event appends, {w} writers, combining on"),
        on,
        "events/s",
        Some(("1 writer", one)),
        Some(Target::RatioAtLeast(5.0)),
    );
    report.compare(
        &format!("PostgreSQL single-event appends, {w} writers, combining off"),
        off,
        "events/s",
        Some(("1 writer", one)),
        None,
    );

    // batched appends against COPY of the same rows, one COPY per batch
    let events = sizes.pg_batches * BATCH as u64;
    let b = bar(events, "PostgreSQL ceiling: COPY into custody_events");
    let meter = CpuMeter::start();
    let took = pg_copy(&pool, sizes.pg_batches, payload, &b).await?;
    b.finish_and_clear();
    let name = format!(
        "PostgreSQL ceiling: COPY into custody_events, {BATCH} rows per COPY (own transaction)"
    );
    report.cpu(&name, meter.stop(), events);
    let copy = report.rate(&name, events, took);
    sqlx::query("DELETE FROM custody_events WHERE tx < 0")
        .execute(&pool)
        .await?;
    let batched = batched_appends(report, &store, sizes.pg_batches, "PostgreSQL", payload).await?;
    report.compare(
        &format!("PostgreSQL batched appends ({BATCH} per append)"),
        batched,
        "events/s",
        Some(("COPY, same rows", copy)),
        Some(Target::RatioAtLeast(0.7)),
    );

    // reads; the raw ceilings read the same rows in the same order, their
    // positions joined from the sequenced commits as the store does
    const RAW_SELECT: &str = "SELECT c.first_position + e.ordinal AS position, e.stream, \
         e.version, e.id, e.event_type, e.schema_version, e.content_type, e.payload, e.headers, \
         e.tags, e.recorded_at FROM custody_events e JOIN custody_event_commits c ON c.tx = e.tx";
    let raw_stream = {
        let pool = pool.clone();
        move |stream: String| {
            let pool = pool.clone();
            async move {
                let rows = sqlx::query(&format!(
                    "{RAW_SELECT} WHERE e.stream = $1 ORDER BY e.version"
                ))
                .bind(stream)
                .fetch_all(&pool)
                .await?;
                decode_pg(&rows)
            }
        }
    };
    // the sequencer runs on reads: number every committed append first so
    // the raw stream reads see the same rows
    store.sequence().await?;
    reads(report, &store, sizes.pg_batches, "PostgreSQL", raw_stream).await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM custody_events")
        .fetch_one(&pool)
        .await?;
    let raw_all = {
        let pool = pool.clone();
        async move {
            let rows = sqlx::query(&format!("{RAW_SELECT} ORDER BY position"))
                .fetch_all(&pool)
                .await?;
            decode_pg(&rows)
        }
    };
    catch_up(report, &store, u64::try_from(total)?, "PostgreSQL", raw_all).await?;

    aggregates(
        report,
        &store,
        sizes.aggregates,
        w,
        "PostgreSQL",
        &durability,
    )
    .await?;
    drop(store);
    pool.close().await;
    Ok(())
}

/// `batches` COPYs of [`BATCH`] rows each (CSV), each its own transaction.
async fn pg_copy(
    pool: &PgPool,
    batches: u64,
    payload: &[u8],
    b: &indicatif::ProgressBar,
) -> anyhow::Result<Duration> {
    use std::fmt::Write as _;
    let mut hex = String::with_capacity(payload.len() * 2 + 2);
    hex.push_str("\\x");
    for byte in payload {
        let _ = write!(hex, "{byte:02x}");
    }
    let now = chrono::Utc::now().to_rfc3339();
    let mut conn = pool.acquire().await?;
    let start = Instant::now();
    for batch in 0..batches {
        // the CSV is built inside the measured time, as a caller of COPY must
        let mut csv = String::with_capacity(BATCH * (hex.len() + 120));
        for ordinal in 0..BATCH {
            let _ = writeln!(
                csv,
                "{},{ordinal},copy-{batch},{},{},BenchEvent,1,application/octet-stream,{hex},{{}},{{}},{now}",
                -1 - i64::try_from(batch)?,
                ordinal + 1,
                Uuid::now_v7()
            );
        }
        let mut copy = conn
            .copy_in_raw(&format!(
                "COPY custody_events ({PG_COLUMNS}) FROM STDIN (FORMAT csv)"
            ))
            .await?;
        copy.send(csv.into_bytes()).await?;
        copy.finish().await?;
        b.set_position((batch + 1) * BATCH as u64);
    }
    Ok(start.elapsed())
}

fn decode_pg(rows: &[sqlx::postgres::PgRow]) -> anyhow::Result<u64> {
    let mut bytes = 0usize;
    for r in rows {
        let _: i64 = r.try_get(0)?;
        let stream: String = r.try_get(1)?;
        let _: i64 = r.try_get(2)?;
        let _: Uuid = r.try_get(3)?;
        let t: String = r.try_get(4)?;
        let _: i32 = r.try_get(5)?;
        let ct: String = r.try_get(6)?;
        let payload: Vec<u8> = r.try_get(7)?;
        let headers: String = r.try_get(8)?;
        let tags: Vec<String> = r.try_get(9)?;
        let _: chrono::DateTime<chrono::Utc> = r.try_get(10)?;
        bytes += stream.len() + t.len() + ct.len() + payload.len() + headers.len() + tags.len();
    }
    std::hint::black_box(bytes);
    Ok(rows.len() as u64)
}

// ---------------------------------------------------------------------------
// The phases, the same on every store

/// The event every append phase writes.
fn event(payload: &[u8]) -> EventData {
    EventData::new("BenchEvent", "application/octet-stream", payload.to_vec())
}

/// Fail the run on an outcome other than a successful append.
fn appended(outcome: AppendOutcome, what: &str) -> anyhow::Result<()> {
    match outcome {
        AppendOutcome::Appended(_) => Ok(()),
        other => anyhow::bail!("{what}: the append was refused: {other:?}"),
    }
}

/// [`drive`] `op` `ops` times from `writers` writers under a progress bar;
/// reports the rate of `events` as `name`, with its CPU.
async fn rate_of<F, Fut>(
    report: &mut Report,
    writers: usize,
    ops: u64,
    events: u64,
    name: &str,
    op: F,
) -> anyhow::Result<f64>
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let b = bar(ops, name);
    let meter = CpuMeter::start();
    let took = drive(writers, ops, None, &b, op).await?;
    report.cpu(name, meter.stop(), events);
    b.finish_and_clear();
    Ok(report.rate(name, events, took))
}

/// Single-event appends (`ExpectedVersion::Any`, streams
/// `<prefix>-0..999`) from `writers` writers, after a warm-up; reports the
/// rate and each append's latency.
async fn single_appends<S: EventStore>(
    report: &mut Report,
    store: S,
    writers: usize,
    n: u64,
    backend: &str,
    prefix: &str,
    payload: &Arc<[u8]>,
) -> anyhow::Result<f64> {
    let hist = Arc::new(Mutex::new(new_histogram()?));
    let op = {
        let (store, payload, hist) = (store.clone(), payload.clone(), hist.clone());
        let prefix = prefix.to_owned();
        move |i: u64| {
            let (store, payload, hist) = (store.clone(), payload.clone(), hist.clone());
            let stream = format!("{prefix}-{}", i % SINGLE_STREAMS);
            async move {
                let began = Instant::now();
                let outcome = store
                    .append(&stream, ExpectedVersion::Any, vec![event(&payload)])
                    .await?;
                let us = began.elapsed().as_micros();
                appended(outcome, "single-event append")?;
                hist.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
                Ok(())
            }
        }
    };
    let warm = warm_up(n).min(100);
    drive(
        writers,
        warm,
        None,
        &bar(warm, &format!("{backend}: warm-up")),
        op.clone(),
    )
    .await?;
    *hist.lock().unwrap_or_else(|e| e.into_inner()) = new_histogram()?;
    let combining = if writers > 1 { ", " } else { "" };
    let setting = match prefix {
        "s8on" => "combining on",
        "s8off" => "combining off",
        _ => "",
    };
    let name = format!(
        "{backend} single-event appends, {writers} writer{}{combining}{setting}",
        if writers == 1 { "" } else { "s" }
    );
    let rate = rate_of(report, writers, n, n, &name, op).await?;
    let h: Histogram<u64> = hist.lock().unwrap_or_else(|e| e.into_inner()).clone();
    report.latency(Latency::from_micros(&format!("{name}: append"), &h));
    Ok(rate)
}

/// `batches` appends of [`BATCH`] events each, to new streams
/// `batch-<i>` (`ExpectedVersion::NoStream`), one writer.
async fn batched_appends<S: EventStore>(
    report: &mut Report,
    store: &S,
    batches: u64,
    backend: &str,
    payload: &Arc<[u8]>,
) -> anyhow::Result<f64> {
    let op = {
        let (store, payload) = (store.clone(), payload.clone());
        move |i: u64| {
            let (store, payload) = (store.clone(), payload.clone());
            async move {
                let events = (0..BATCH).map(|_| event(&payload)).collect();
                let outcome = store
                    .append(&format!("batch-{i}"), ExpectedVersion::NoStream, events)
                    .await?;
                appended(outcome, "batched append")
            }
        }
    };
    rate_of(
        report,
        1,
        batches,
        batches * BATCH as u64,
        &format!("{backend} batched appends, {BATCH} events per append, 1 writer"),
        op,
    )
    .await
}

/// Read every `batch-<i>` stream forward in pages of [`PAGE`] through the
/// store, then the same rows with `raw(stream)`; compare.
async fn reads<S, R, RFut>(
    report: &mut Report,
    store: &S,
    batches: u64,
    backend: &str,
    raw: R,
) -> anyhow::Result<()>
where
    S: EventStore,
    R: Fn(String) -> RFut + Clone + Send + Sync + 'static,
    RFut: std::future::Future<Output = anyhow::Result<u64>> + Send + 'static,
{
    let events = batches * BATCH as u64;
    let read_op = {
        let store = store.clone();
        move |i: u64| {
            let store = store.clone();
            async move {
                let stream = format!("batch-{i}");
                let mut from = 1u64;
                let mut got = 0usize;
                loop {
                    let slice = store
                        .read_stream(&stream, Direction::Forward, from, PAGE)
                        .await?;
                    got += slice.events.len();
                    match slice.events.last() {
                        Some(last) if slice.events.len() == PAGE => from = last.version + 1,
                        _ => break,
                    }
                }
                anyhow::ensure!(
                    got == BATCH,
                    "stream {stream}: read {got} of {BATCH} events"
                );
                Ok(())
            }
        }
    };
    let custody = rate_of(
        report,
        1,
        batches,
        events,
        &format!("{backend} stream reads, {BATCH}-event streams, pages of {PAGE}"),
        read_op,
    )
    .await?;
    let raw_op = move |i: u64| {
        let raw = raw.clone();
        async move {
            let n = raw(format!("batch-{i}")).await?;
            anyhow::ensure!(n == BATCH as u64, "raw read of batch-{i}: {n} rows");
            Ok(())
        }
    };
    let ceiling = rate_of(
        report,
        1,
        batches,
        events,
        &format!("{backend} ceiling: raw SELECT of the same streams"),
        raw_op,
    )
    .await?;
    report.compare(
        &format!("{backend} stream reads"),
        custody,
        "events/s",
        Some(("raw SELECT", ceiling)),
        None,
    );
    Ok(())
}

/// Read the whole global log from position 0 in pages of [`PAGE`], checking
/// every one of `total` events comes once, in increasing positions; then
/// the same rows with one raw SELECT. Returns the store's rate.
async fn catch_up<S, RFut>(
    report: &mut Report,
    store: &S,
    total: u64,
    backend: &str,
    raw: RFut,
) -> anyhow::Result<f64>
where
    S: EventStore,
    RFut: std::future::Future<Output = anyhow::Result<u64>>,
{
    let name = format!("{backend} catch-up read of the global log, pages of {PAGE}");
    let b = bar(total, &name);
    let filter = LogFilter::all();
    let meter = CpuMeter::start();
    let start = Instant::now();
    let (mut after, mut got) = (0u64, 0u64);
    loop {
        let slice = store.read_all(after, &filter, PAGE).await?;
        for e in &slice.events {
            anyhow::ensure!(
                e.position > after,
                "catch-up: position {} after {after}",
                e.position
            );
            after = e.position;
        }
        got += slice.events.len() as u64;
        b.set_position(got);
        after = after.max(slice.scanned_to);
        if slice.events.is_empty() && after >= slice.head {
            break;
        }
    }
    let took = start.elapsed();
    report.cpu(&name, meter.stop(), got);
    b.finish_and_clear();
    anyhow::ensure!(
        got == total,
        "{backend} catch-up delivered {got} events; the table holds {total}"
    );
    let custody = report.rate(&name, got, took);

    let raw_name = format!("{backend} ceiling: raw SELECT of the whole log in position order");
    let meter = CpuMeter::start();
    let start = Instant::now();
    let n = raw.await?;
    let took = start.elapsed();
    report.cpu(&raw_name, meter.stop(), n);
    let ceiling = report.rate(&raw_name, n, took);
    report.compare(
        &format!("{backend} catch-up read of the global log"),
        custody,
        "events/s",
        Some(("raw SELECT", ceiling)),
        None,
    );
    Ok(custody)
}

/// The workload: `aggregates` aggregates × [`PER_AGGREGATE`] events, each
/// event its own command from `writers` workers (load the stream, decide
/// the next event from its state, append with `Exact`; a conflict reloads
/// and decides again), then every aggregate read back and checked.
async fn aggregates<S: EventStore>(
    report: &mut Report,
    store: &S,
    aggregates: u64,
    writers: usize,
    backend: &str,
    durability: &str,
) -> anyhow::Result<()> {
    let conflicts = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(new_histogram()?));
    let command = {
        let (store, conflicts, hist) = (store.clone(), conflicts.clone(), hist.clone());
        move |i: u64| {
            let (store, conflicts, hist) = (store.clone(), conflicts.clone(), hist.clone());
            async move {
                let stream = format!("counter-{}", i % aggregates);
                let began = Instant::now();
                for _ in 0..RETRIES {
                    // load: fold the stream into the state (the count and the sum)
                    let read = store
                        .read_stream(&stream, Direction::Forward, 1, 1000)
                        .await?;
                    let (count, sum) = read.events.iter().try_fold((0u64, 0u64), |(c, s), e| {
                        let v: serde_json::Value = serde_json::from_slice(&e.payload)?;
                        anyhow::Ok((c + 1, s + v["n"].as_u64().unwrap_or(0)))
                    })?;
                    // decide
                    let next = EventData::json(
                        "Incremented",
                        &serde_json::json!({ "n": count + 1, "sum": sum + count + 1 }),
                    )?;
                    let expected = ExpectedVersion::Exact(read.version.unwrap_or(0));
                    match store.append(&stream, expected, vec![next]).await? {
                        AppendOutcome::Appended(_) => {
                            let us = began.elapsed().as_micros();
                            hist.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
                            return Ok(());
                        }
                        AppendOutcome::WrongVersion { .. } => {
                            conflicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        other => anyhow::bail!("command on {stream}: {other:?}"),
                    }
                }
                anyhow::bail!("command on {stream}: {RETRIES} conflicts in a row")
            }
        }
    };
    let events = aggregates * PER_AGGREGATE;
    let name = format!(
        "{backend} workload: {aggregates} aggregates x {PER_AGGREGATE} events, a command per event (load, decide, append Exact), {writers} workers, {durability}"
    );
    let rate = rate_of(report, writers, events, events, &name, command).await?;
    let h: Histogram<u64> = hist.lock().unwrap_or_else(|e| e.into_inner()).clone();
    report.latency(Latency::from_micros(
        &format!("{backend} workload: one command (load, decide, append)"),
        &h,
    ));
    report.param(
        &format!("{}_workload_conflicts", backend.to_lowercase()),
        conflicts.load(std::sync::atomic::Ordering::Relaxed),
    );

    let readback = {
        let store = store.clone();
        move |a: u64| {
            let store = store.clone();
            async move {
                let stream = format!("counter-{a}");
                let read = store
                    .read_stream(&stream, Direction::Forward, 1, 1000)
                    .await?;
                let versions: Vec<u64> = read.events.iter().map(|e| e.version).collect();
                let want: Vec<u64> = (1..=PER_AGGREGATE).collect();
                anyhow::ensure!(versions == want, "{stream} read back versions {versions:?}");
                let last: serde_json::Value = read
                    .events
                    .last()
                    .map(|e| serde_json::from_slice(&e.payload))
                    .transpose()?
                    .context("no events")?;
                anyhow::ensure!(
                    last["n"] == PER_AGGREGATE,
                    "{stream}: its last command saw {} events",
                    last["n"]
                );
                Ok(())
            }
        }
    };
    let back_name = format!(
        "{backend} workload: read every aggregate back ({aggregates} streams of {PER_AGGREGATE}), {writers} readers"
    );
    let back = rate_of(report, writers, aggregates, events, &back_name, readback).await?;
    report.compare(
        &format!("{backend} workload commands ({durability})"),
        rate,
        "events/s",
        None,
        None,
    );
    report.compare(
        &format!("{backend} workload read-back"),
        back,
        "events/s",
        None,
        None,
    );
    Ok(())
}
