//! Outbox bloat under steady load: published flag + batched prune against
//! delete-after-ack, on a real PostgreSQL (see docs/OUTBOX_RETENTION.md).
//!
//! ```text
//! cargo run --release -p custody-postgres --example outbox_bloat -- postgres://postgres@127.0.0.1:5432/postgres [rounds] [messages-per-round]
//! ```
//!
//! Creates a database `custody_bloat_<random>`, runs every strategy in a
//! schema of its own (same load, autovacuum at the server's settings), prints
//! one table per strategy and drops the database.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use custody_core::{Message, OutboxStore, PublishAck};
use custody_postgres::PgOutbox;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};

/// Messages per producer transaction.
const TX_SIZE: usize = 500;
/// Messages per relay batch (fetch + ack).
const RELAY_BATCH: usize = 500;
/// Rows per prune call.
const PRUNE_LIMIT: usize = 1000;
const RELAY: &str = "bloat-relay";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Strategy {
    /// status = 1 on ack, then prune everything published (retention 0).
    FlagPrune,
    /// Same, keeping the last two rounds (a retention window).
    FlagPruneWindow,
    /// Same as FlagPrune without the 0002 retention index.
    FlagPruneNoIndex,
    /// DELETE on ack.
    DeleteOnAck,
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::FlagPrune => "A: flag + prune, retention 0",
            Strategy::FlagPruneWindow => "A2: flag + prune, keep 2 rounds",
            Strategy::FlagPruneNoIndex => "A0: flag + prune, retention 0, no retention index",
            Strategy::DeleteOnAck => "B: delete after ack",
        }
    }
    fn schema(self) -> &'static str {
        match self {
            Strategy::FlagPrune => "s_flag",
            Strategy::FlagPruneWindow => "s_window",
            Strategy::FlagPruneNoIndex => "s_noidx",
            Strategy::DeleteOnAck => "s_delete",
        }
    }
}

struct Row {
    round: usize,
    total_bytes: i64,
    index_bytes: i64,
    live: i64,
    dead: i64,
    autovacuums: i64,
    rate: f64,
    prune_ms: f64,
    /// msg/s counting the prune too.
    rate_all: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .context("usage: outbox_bloat <postgres url> [rounds] [messages-per-round]")?;
    let rounds: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(20);
    let per_round: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000);

    let server: PgConnectOptions = url.parse()?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos();
    let name = format!("custody_bloat_{:x}{:x}", std::process::id(), nanos);
    let mut admin = sqlx::PgConnection::connect_with(&server).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    let result = run(&server.clone().database(&name), rounds, per_round).await;
    // FORCE: the LISTEN pool of PgOutbox may still be connected.
    let drop = sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await;
    result?;
    drop?;
    Ok(())
}

async fn run(db: &PgConnectOptions, rounds: usize, per_round: usize) -> anyhow::Result<()> {
    let control = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(db.clone())
        .await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&control)
        .await?;
    let settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, setting FROM pg_settings WHERE name IN ('autovacuum', \
         'autovacuum_naptime', 'autovacuum_vacuum_scale_factor', 'autovacuum_vacuum_threshold', \
         'autovacuum_vacuum_insert_scale_factor') ORDER BY name",
    )
    .fetch_all(&control)
    .await?;
    println!(
        "PostgreSQL {version}; {rounds} rounds x {per_round} messages, producer tx {TX_SIZE}, \
         relay batch {RELAY_BATCH}, prune limit {PRUNE_LIMIT}; {}",
        settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("date {}", Utc::now().format("%Y-%m-%d %H:%M UTC"));

    let strategies = [
        Strategy::DeleteOnAck,
        Strategy::FlagPrune,
        Strategy::FlagPruneNoIndex,
        Strategy::FlagPruneWindow,
    ];
    let mut summary = Vec::new();
    for s in strategies {
        sqlx::query(&format!("CREATE SCHEMA {}", s.schema()))
            .execute(&control)
            .await?;
        // One connection: every statement's table statistics come from the
        // backend we flush below.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(db.clone().options([("search_path", s.schema())]))
            .await?;
        custody_postgres::migrate(&pool).await?;
        if s == Strategy::FlagPruneNoIndex {
            sqlx::query("DROP INDEX custody_outbox_done")
                .execute(&pool)
                .await?;
        }
        let rows = load(s, &pool, rounds, per_round).await?;
        println!("\n### {}\n", s.name());
        println!("| round | total MB | index MB | live | dead | vacuums (auto + emulated) | msg/s (enqueue+fetch+ack) | prune ms |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {:.1} | {:.1} | {} | {} | {} | {:.0} | {:.0} |",
                r.round,
                mb(r.total_bytes),
                mb(r.index_bytes),
                r.live,
                r.dead,
                r.autovacuums,
                r.rate,
                r.prune_ms
            );
        }
        summary.push((s, rows));
        pool.close().await;
    }

    println!("\n### Summary (last round; rates are the mean over all rounds)\n");
    println!("| strategy | total MB | index MB | max total MB | dead tuples | mean msg/s | mean msg/s incl. prune | incl. prune / B |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mean =
        |rows: &[Row]| rows.iter().map(|r| r.rate_all).sum::<f64>() / rows.len().max(1) as f64;
    let mean_ack =
        |rows: &[Row]| rows.iter().map(|r| r.rate).sum::<f64>() / rows.len().max(1) as f64;
    let base = summary
        .iter()
        .find(|(s, _)| *s == Strategy::DeleteOnAck)
        .map(|(_, r)| mean(r))
        .unwrap_or(1.0);
    for (s, rows) in &summary {
        if let Some(last) = rows.last() {
            let max_total = rows.iter().map(|r| r.total_bytes).max().unwrap_or(0);
            println!(
                "| {} | {:.1} | {:.1} | {:.1} | {} | {:.0} | {:.0} | {:.2} |",
                s.name(),
                mb(last.total_bytes),
                mb(last.index_bytes),
                mb(max_total),
                last.dead,
                mean_ack(rows),
                mean(rows),
                mean(rows) / base
            );
        }
    }
    Ok(())
}

fn mb(b: i64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn message(n: usize) -> anyhow::Result<Message> {
    Ok(Message::builder("orders", format!("order-{}", n % 100), "OrderPlaced")
        .json(&serde_json::json!({
            "order": n,
            "customer": format!("customer-{}", n % 1000),
            "lines": [{"sku": "SKU-1", "qty": 2, "price": 1299}, {"sku": "SKU-2", "qty": 1, "price": 499}],
            "note": "steady load for the outbox bloat measurement",
        }))?
        .build()?)
}

async fn load(
    s: Strategy,
    pool: &PgPool,
    rounds: usize,
    per_round: usize,
) -> anyhow::Result<Vec<Row>> {
    let outbox = PgOutbox::new(pool.clone()).with_notify(false);
    let parts: Vec<u32> = (0..outbox.partitions()).collect();
    let mut round_starts: Vec<DateTime<Utc>> = Vec::new();
    let mut out = Vec::new();
    let mut n = 0;
    let mut vacuums = 0_i64;
    for round in 1..=rounds {
        round_starts.push(Utc::now());
        let started = Instant::now();
        // producers
        let mut left = per_round;
        while left > 0 {
            let size = left.min(TX_SIZE);
            let msgs = (0..size)
                .map(|i| message(n + i))
                .collect::<anyhow::Result<Vec<_>>>()?;
            n += size;
            let mut tx = pool.begin().await?;
            outbox.enqueue_batch(&mut tx, &msgs).await?;
            tx.commit().await?;
            left -= size;
        }
        // relay: fetch pending, "publish", acknowledge
        let mut done = 0;
        let mut idle = Duration::ZERO;
        while done < per_round {
            let now = Utc::now();
            outbox
                .acquire_leases(RELAY, Duration::from_secs(60), now)
                .await?;
            let batch = outbox.fetch_batch(&parts, RELAY_BATCH, now).await?;
            if batch.is_empty() {
                // the visibility guard waits for other sessions' transactions
                anyhow::ensure!(
                    idle < Duration::from_secs(60),
                    "no pending rows visible for 60 s"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
                idle += Duration::from_millis(2);
                continue;
            }
            let positions: Vec<i64> = batch.iter().map(|r| r.position).collect();
            let acked = if s == Strategy::DeleteOnAck {
                sqlx::query("DELETE FROM custody_outbox WHERE position = ANY($1)")
                    .bind(&positions)
                    .execute(pool)
                    .await?
                    .rows_affected()
            } else {
                let acks: Vec<(i64, PublishAck)> = positions
                    .iter()
                    .map(|p| (*p, PublishAck::default()))
                    .collect();
                outbox.mark_published(RELAY, &acks, now).await?
            };
            anyhow::ensure!(acked as usize == positions.len(), "ack lost rows");
            done += positions.len();
        }
        let rate = per_round as f64 / started.elapsed().as_secs_f64();
        // retention
        let pruned_at = Instant::now();
        let older_than = match s {
            Strategy::DeleteOnAck => None,
            Strategy::FlagPrune | Strategy::FlagPruneNoIndex => Some(Utc::now()),
            // keep what was published in this round and the one before
            Strategy::FlagPruneWindow => round_starts.len().checked_sub(2).map(|i| round_starts[i]),
        };
        if let Some(older_than) = older_than {
            while outbox.prune(&parts, older_than, PRUNE_LIMIT).await? == PRUNE_LIMIT as u64 {}
        }
        let prune_ms = pruned_at.elapsed().as_secs_f64() * 1000.0;
        let rate_all = per_round as f64 / started.elapsed().as_secs_f64();

        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(pool)
            .await?;
        let (total_bytes, index_bytes, live, dead, autovacuums): (i64, i64, i64, i64, i64) =
            sqlx::query_as(
                "SELECT pg_total_relation_size(relid), pg_indexes_size(relid), \
                        n_live_tup, n_dead_tup, autovacuum_count \
                 FROM pg_stat_user_tables WHERE relid = 'custody_outbox'::regclass",
            )
            .fetch_one(pool)
            .await?;
        // This server may run with autovacuum off (the measuring machine
        // does); do what autovacuum at its default thresholds would do
        // (without the naptime delay): a plain VACUUM once dead tuples exceed
        // autovacuum_vacuum_threshold + scale_factor * live tuples.
        let autovacuums = if dead > 50 + live / 5 {
            sqlx::query("VACUUM custody_outbox").execute(pool).await?;
            vacuums += 1;
            autovacuums + vacuums
        } else {
            autovacuums + vacuums
        };
        out.push(Row {
            round,
            total_bytes,
            index_bytes,
            live,
            dead,
            autovacuums,
            rate,
            prune_ms,
            rate_all,
        });
    }
    Ok(out)
}
