//! `custody-bench SCENARIO` (also reachable as `custody bench SCENARIO` when
//! installed beside `custody`): throughput and latency of custody's pipelines,
//! each measured in the same run, on the same machine, against the ceiling
//! it is compared with (see docs/ARCHITECTURE.md, "Measuring").
//!
//! Every run gets fresh PostgreSQL databases (`custody_bench_<random>`,
//! dropped at the end), its own JetStream stream (deleted at the end) and
//! SQLite files in a temporary directory.
#![forbid(unsafe_code)]

mod cpu;
mod drain;
mod embedded;
mod eventstore;
mod outbox;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Parser, ValueEnum};
use custody::ConsumerConfig;
use custody::{DeadLetter, InboxOutcome, InboxStore, Message};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::time::Instant;
use uuid::Uuid;

// The relay and the consumer allocate and free many small buffers per message
// (rows, headers, envelopes); glibc's malloc took 30 % of the relay's CPU in a
// profile of `bench relay-drain` (malloc_consolidate, _int_free, …).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measure a pipeline against its ceilings on this machine (docs/BENCHMARKS.md).
#[derive(Debug, Parser)]
#[command(name = "custody-bench", version, long_about = None)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    custody_scenario::process::main_with(run(cli.args))
}

/// Which benchmark to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    /// PostgreSQL outbox → relay → NATS JetStream → PostgreSQL inbox.
    Outbox,
    /// SQLite outbox → embedded transport → SQLite inbox.
    OutboxEmbedded,
    /// A pre-filled PostgreSQL outbox backlog drained to NATS JetStream.
    RelayDrain,
    /// The event store on SQLite and PostgreSQL: appends, reads, catch-up, aggregates.
    Eventstore,
    /// Not implemented yet: sagas do not exist.
    Saga,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Outbox => "outbox",
            Scenario::OutboxEmbedded => "outbox-embedded",
            Scenario::RelayDrain => "relay-drain",
            Scenario::Eventstore => "eventstore",
            Scenario::Saga => "saga",
        }
    }
}

/// `custody bench` options.
#[derive(Debug, Clone, Args)]
pub(crate) struct BenchArgs {
    /// The scenario to run.
    #[arg(value_enum)]
    pub(crate) scenario: Scenario,
    /// The small size (each scenario well under a minute) instead of the full one.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Concurrent producers (each commits one transaction at a time).
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub(crate) producers: usize,
    /// Messages per measured phase (default: per scenario and size; for
    /// relay-drain the backlog size, 1,000,000 full).
    #[arg(long, value_name = "N")]
    pub(crate) messages: Option<u64>,
    /// Offered rate (msg/s) of the latency phase of `outbox` and
    /// `outbox-embedded`, instead of half the run's own saturated end-to-end
    /// rate: compares latency across builds at one load.
    #[arg(long, value_name = "MSG_PER_S")]
    pub(crate) load_rate: Option<f64>,
    /// Payload size of each message (and of each business row's data).
    #[arg(long, default_value_t = 256, value_name = "BYTES")]
    pub(crate) payload_bytes: usize,
    /// Where to write the JSON results (default `target/bench/<scenario>.json`).
    #[arg(long, value_name = "FILE")]
    pub(crate) json: Option<PathBuf>,
    /// NATS server.
    #[arg(long, default_value = "nats://127.0.0.1:4222", value_name = "URL")]
    pub(crate) nats: String,
    /// PostgreSQL server; the benchmark creates and drops its own databases on it.
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/test",
        value_name = "URL"
    )]
    pub(crate) postgres: String,
    /// Run the relay without sequence numbering (`relay.sequence-numbers = false`), to
    /// measure what numbering costs (docs/SEQUENCES.md).
    #[arg(long)]
    pub(crate) no_sequence_numbers: bool,
    /// `outbox`: how often, at most, the producers' enqueues send NOTIFY
    /// (`PgOutbox::with_notify_interval`; 0 = every enqueue), instead of the
    /// library's default.
    #[arg(long, value_name = "MS")]
    pub(crate) notify_interval_ms: Option<u64>,
    /// `outbox`: the producers enqueue without the per-key advisory locks
    /// (`PgOutbox::with_key_locks(false)`). **For measurement only**: it
    /// shows what the locks cost; without them a key's messages can reach
    /// consumers out of commit order (docs/SEQUENCES.md, "Order per key").
    /// Every run also measures producer commits with and without the locks
    /// side by side.
    #[arg(long)]
    pub(crate) no_key_locks: bool,
    /// The consumer's `consumer.poison-after` (default 3; 0 turns poison
    /// detection and its statements off), to measure what it costs.
    #[arg(long, value_name = "N")]
    pub(crate) poison_after: Option<u32>,
}

impl BenchArgs {
    /// The consumer settings a scenario runs with.
    pub(crate) fn consumer_config(&self) -> ConsumerConfig {
        let mut cfg = ConsumerConfig::new("bench");
        if let Some(n) = self.poison_after {
            cfg.poison_after = n;
        }
        cfg
    }
}

impl BenchArgs {
    /// `--messages`, or the scenario's default for the chosen size.
    /// The relay settings a scenario runs with.
    pub(crate) fn relay_config(&self) -> custody::RelayConfig {
        custody::RelayConfig {
            sequence_numbers: !self.no_sequence_numbers,
            ..custody::RelayConfig::default()
        }
    }

    pub(crate) fn messages_or(&self, quick: u64, full: u64) -> u64 {
        self.messages
            .unwrap_or(if self.quick { quick } else { full })
            .max(1)
    }

    fn size(&self) -> &'static str {
        if self.quick {
            "quick"
        } else {
            "full"
        }
    }
}

/// Run a benchmark, print its table and write its JSON.
pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.producers == 0 {
        anyhow::bail!("--producers must be at least 1");
    }
    let mut report = Report::new(&args);
    match args.scenario {
        Scenario::Outbox => outbox::run(&args, &mut report).await?,
        Scenario::OutboxEmbedded => embedded::run(&args, &mut report).await?,
        Scenario::RelayDrain => drain::run(&args, &mut report).await?,
        Scenario::Eventstore => eventstore::run(&args, &mut report).await?,
        Scenario::Saga => {
            anyhow::bail!(
                "scenario {} is not implemented: custody has no sagas yet (see docs/BENCHMARKS.md)",
                args.scenario.name(),
            )
        }
    }
    report.finished = Utc::now();
    print!("{}", report.render());
    let path = args
        .json
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("target/bench/{}.json", args.scenario.name())));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("results written to {}", path.display());
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------
// Report

/// Where the figures were taken.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpus: usize,
    pub(crate) cpu_model: String,
    pub(crate) memory_mib: u64,
    pub(crate) kernel: String,
}

impl Machine {
    fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| status_kib(&m, "MemTotal:"))
            .map(|k| k / 1024)
            .unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            memory_mib,
            kernel,
        }
    }
}

/// A throughput figure.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Rate {
    pub(crate) name: String,
    pub(crate) messages: u64,
    pub(crate) seconds: f64,
    pub(crate) per_second: f64,
}

/// A latency distribution, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Latency {
    pub(crate) name: String,
    pub(crate) count: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
}

impl Latency {
    /// Summarise a histogram of microseconds.
    pub(crate) fn from_micros(name: &str, h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            name: name.to_owned(),
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// What a figure is held to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Target {
    /// The ratio must be at least this.
    RatioAtLeast(f64),
    /// The value (ms) must be at most this.
    AtMostMs(f64),
    /// The value (MiB) must be below this.
    BelowMib(f64),
    /// The value (a rate, per second) must be at least this.
    RateAtLeast(f64),
}

impl Target {
    fn met(self, ratio: Option<f64>, value: f64) -> Option<bool> {
        match self {
            Target::RatioAtLeast(t) => ratio.map(|r| r >= t),
            Target::AtMostMs(t) => Some(value <= t),
            Target::BelowMib(t) => Some(value < t),
            Target::RateAtLeast(t) => Some(value >= t),
        }
    }

    fn describe(self) -> String {
        match self {
            Target::RatioAtLeast(t) => format!("≥ {t:.2}×"),
            Target::AtMostMs(t) => format!("≤ {t} ms"),
            Target::BelowMib(t) => format!("< {t} MiB"),
            Target::RateAtLeast(t) => format!("≥ {t:.0}/s"),
        }
    }
}

/// `value / ceiling`, or `None` when the ceiling is not a positive number.
pub(crate) fn ratio(value: f64, ceiling: f64) -> Option<f64> {
    (ceiling.is_finite() && ceiling > 0.0 && value.is_finite()).then(|| value / ceiling)
}

/// A figure compared with its ceiling (or checked against a target).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Comparison {
    pub(crate) name: String,
    pub(crate) value: f64,
    pub(crate) unit: String,
    pub(crate) ceiling_name: Option<String>,
    pub(crate) ceiling: Option<f64>,
    pub(crate) ratio: Option<f64>,
    pub(crate) target: Option<Target>,
    pub(crate) met: Option<bool>,
}

/// Everything one `custody bench` run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) scenario: String,
    pub(crate) size: String,
    pub(crate) started: DateTime<Utc>,
    pub(crate) finished: DateTime<Utc>,
    pub(crate) command: String,
    pub(crate) machine: Machine,
    pub(crate) parameters: serde_json::Map<String, serde_json::Value>,
    pub(crate) throughput: Vec<Rate>,
    pub(crate) latency: Vec<Latency>,
    pub(crate) comparisons: Vec<Comparison>,
    /// CPU time per message of measured phases, by process group.
    pub(crate) cpu: Vec<CpuFigure>,
    pub(crate) notes: Vec<String>,
}

/// The CPU a phase used, for `messages` messages.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CpuFigure {
    pub(crate) name: String,
    pub(crate) messages: u64,
    #[serde(flatten)]
    pub(crate) used: cpu::CpuUse,
}

impl Report {
    fn new(args: &BenchArgs) -> Report {
        let mut parameters = serde_json::Map::new();
        parameters.insert("producers".into(), args.producers.into());
        parameters.insert("payload_bytes".into(), args.payload_bytes.into());
        Report {
            scenario: args.scenario.name().to_owned(),
            size: args.size().to_owned(),
            started: Utc::now(),
            finished: Utc::now(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine: Machine::detect(),
            parameters,
            throughput: Vec::new(),
            latency: Vec::new(),
            comparisons: Vec::new(),
            cpu: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Record a parameter of the run.
    pub(crate) fn param(&mut self, name: &str, value: impl Into<serde_json::Value>) {
        self.parameters.insert(name.to_owned(), value.into());
    }

    /// Record a throughput figure and return its rate.
    pub(crate) fn rate(&mut self, name: &str, messages: u64, elapsed: Duration) -> f64 {
        let seconds = elapsed.as_secs_f64();
        let per_second = if seconds > 0.0 {
            messages as f64 / seconds
        } else {
            0.0
        };
        self.throughput.push(Rate {
            name: name.to_owned(),
            messages,
            seconds,
            per_second,
        });
        per_second
    }

    /// Record a latency distribution.
    pub(crate) fn latency(&mut self, l: Latency) {
        self.latency.push(l);
    }

    /// Compare `value` with `ceiling` and check the ratio against `target`.
    pub(crate) fn compare(
        &mut self,
        name: &str,
        value: f64,
        unit: &str,
        ceiling: Option<(&str, f64)>,
        target: Option<Target>,
    ) {
        let r = ceiling.and_then(|(_, c)| ratio(value, c));
        self.comparisons.push(Comparison {
            name: name.to_owned(),
            value,
            unit: unit.to_owned(),
            ceiling_name: ceiling.map(|(n, _)| n.to_owned()),
            ceiling: ceiling.map(|(_, c)| c),
            ratio: r,
            target,
            met: target.and_then(|t| t.met(r, value)),
        });
    }

    /// Record the CPU a phase of `messages` messages used (nothing when
    /// /proc could not be read).
    pub(crate) fn cpu(&mut self, name: &str, used: Option<cpu::CpuUse>, messages: u64) {
        match used {
            Some(used) => self.cpu.push(CpuFigure {
                name: name.to_owned(),
                messages,
                used,
            }),
            None => self.note(format!("CPU of {name} not measured (no /proc)")),
        }
    }

    /// Add a note (what bounds a figure, what was measured how).
    pub(crate) fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }

    /// The human-readable tables.
    pub(crate) fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\ncustody bench {} ({}), {} CPUs ({}), {}",
            self.scenario,
            self.size,
            self.machine.cpus,
            self.machine.cpu_model,
            self.started.format("%Y-%m-%d %H:%M UTC")
        );
        if !self.throughput.is_empty() {
            let rows = self
                .throughput
                .iter()
                .map(|r| {
                    vec![
                        r.name.clone(),
                        r.messages.to_string(),
                        format!("{:.2}", r.seconds),
                        format!("{:.0}", r.per_second),
                    ]
                })
                .collect();
            table(
                &mut s,
                &["throughput", "messages", "seconds", "msg/s"],
                rows,
            );
        }
        if !self.latency.is_empty() {
            let rows = self
                .latency
                .iter()
                .map(|l| {
                    vec![
                        l.name.clone(),
                        l.count.to_string(),
                        format!("{:.2}", l.p50_ms),
                        format!("{:.2}", l.p99_ms),
                        format!("{:.2}", l.p999_ms),
                        format!("{:.2}", l.max_ms),
                    ]
                })
                .collect();
            table(
                &mut s,
                &["latency (ms)", "count", "p50", "p99", "p99.9", "max"],
                rows,
            );
        }
        if !self.comparisons.is_empty() {
            let rows = self
                .comparisons
                .iter()
                .map(|c| {
                    let ceiling = match (&c.ceiling_name, c.ceiling) {
                        (Some(n), Some(v)) => format!("{n} {}", fmt_value(v, &c.unit)),
                        _ => "-".into(),
                    };
                    vec![
                        c.name.clone(),
                        fmt_value(c.value, &c.unit),
                        ceiling,
                        c.ratio.map(|r| format!("{r:.2}")).unwrap_or("-".into()),
                        c.target.map(Target::describe).unwrap_or("-".into()),
                        match c.met {
                            Some(true) => "yes",
                            Some(false) => "NO",
                            None => "-",
                        }
                        .to_owned(),
                    ]
                })
                .collect();
            table(
                &mut s,
                &["figure", "value", "ceiling", "ratio", "target", "met"],
                rows,
            );
            let _ = writeln!(s, "{TARGETS_ARE_INFORMATIONAL}");
        }
        if !self.cpu.is_empty() {
            let rows = self
                .cpu
                .iter()
                .map(|c| {
                    let per = |x: f64| format!("{:.1}", x * 1e6 / c.messages.max(1) as f64);
                    let u = &c.used;
                    vec![
                        c.name.clone(),
                        per(u.machine_busy_s),
                        per(u.this_process_s),
                        per(u.postgres_s),
                        per(u.nats_server_s),
                        per(u.other_s()),
                        format!("{:.0}%", u.busy_share() * 100.0),
                        format!("{:.1}", u.cores),
                    ]
                })
                .collect();
            table(
                &mut s,
                &[
                    "CPU µs per message",
                    "all",
                    "custody",
                    "postgres",
                    "nats-srv",
                    "other",
                    "busy",
                    "cores",
                ],
                rows,
            );
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}

/// Printed under the targets table: a missed target is information about
/// this machine, not a failure of the run.
const TARGETS_ARE_INFORMATIONAL: &str =
    "targets are informational; the exit status is 0 unless the run failed";

/// A table after a blank line: the first column left-aligned, the others
/// right-aligned, every column as wide as its widest cell or heading (a long
/// row name widens its column instead of breaking the row).
fn table(s: &mut String, header: &[&str], rows: Vec<Vec<String>>) {
    use std::fmt::Write;
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(out, "{cell:<w$}");
            } else {
                let _ = write!(out, " {cell:>w$}");
            }
        }
        out.trim_end().to_owned()
    };
    let _ = writeln!(s, "\n{}", line(header.to_vec()));
    for row in &rows {
        let _ = writeln!(s, "{}", line(row.iter().map(String::as_str).collect()));
    }
}

fn fmt_value(v: f64, unit: &str) -> String {
    if unit.ends_with("/s") || unit == "MiB" {
        format!("{v:.0} {unit}")
    } else {
        format!("{v:.2} {unit}")
    }
}

// ---------------------------------------------------------------------------
// Latency: commit (producer) → processed (consumer commit), one clock.

/// Commit and processing instants of messages, matched by id. Whichever
/// side comes second records `processed - committed` (0 if the consumer's
/// commit returned before the producer's did).
pub(crate) struct Stamps {
    inner: Mutex<StampsInner>,
}

struct StampsInner {
    open: HashMap<Uuid, Side>,
    hist: Histogram<u64>,
    /// commit → the consumer's inbox records the message (its transaction
    /// still open): the transit part of `hist`, the rest is applying it
    received: Histogram<u64>,
    processed: u64,
    last_processed: Option<Instant>,
}

enum Side {
    Committed(Instant),
    Processed,
}

impl Stamps {
    pub(crate) fn new() -> anyhow::Result<Arc<Stamps>> {
        Ok(Arc::new(Stamps {
            inner: Mutex::new(StampsInner {
                open: HashMap::new(),
                hist: new_histogram()?,
                received: new_histogram()?,
                processed: 0,
                last_processed: None,
            }),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StampsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The producer's transaction carrying `id` has committed.
    pub(crate) fn committed(&self, id: Uuid) {
        let now = Instant::now();
        let mut g = self.lock();
        match g.open.remove(&id) {
            Some(Side::Processed) => g.hist.saturating_record(0),
            Some(Side::Committed(_)) | None => {
                g.open.insert(id, Side::Committed(now));
            }
        }
    }

    /// The consumer's inbox has recorded `id` (its transaction is still
    /// open). Counted only when the producer's commit came first.
    pub(crate) fn received(&self, id: Uuid) {
        let now = Instant::now();
        let mut g = self.lock();
        if let Some(Side::Committed(at)) = g.open.get(&id) {
            let us = now.saturating_duration_since(*at).as_micros();
            g.received
                .saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
        }
    }

    /// The consumer's transaction applying `id` has committed.
    pub(crate) fn processed(&self, id: Uuid) {
        let now = Instant::now();
        let mut g = self.lock();
        g.processed += 1;
        g.last_processed = Some(now);
        match g.open.remove(&id) {
            Some(Side::Committed(at)) => {
                let us = now.saturating_duration_since(at).as_micros();
                g.hist
                    .saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
            }
            Some(Side::Processed) | None => {
                g.open.insert(id, Side::Processed);
            }
        }
    }

    /// Messages processed so far and when the last one was.
    pub(crate) fn progress(&self) -> (u64, Option<Instant>) {
        let g = self.lock();
        (g.processed, g.last_processed)
    }

    /// The commit→processed histogram (µs).
    #[cfg(test)]
    pub(crate) fn histogram(&self) -> Histogram<u64> {
        self.lock().hist.clone()
    }

    /// Start a new histogram (next phase); returns the old one.
    pub(crate) fn take_histogram(&self) -> anyhow::Result<Histogram<u64>> {
        let fresh = new_histogram()?;
        Ok(std::mem::replace(&mut self.lock().hist, fresh))
    }

    /// Start a new commit → received histogram; returns the old one.
    pub(crate) fn take_received(&self) -> anyhow::Result<Histogram<u64>> {
        let fresh = new_histogram()?;
        Ok(std::mem::replace(&mut self.lock().received, fresh))
    }
}

/// A histogram of 1 µs .. 10 min at 3 significant digits.
pub(crate) fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000, 3).context("histogram bounds")
}

/// Wait until `stamps` counts `n` processed messages, or fail after `limit`.
pub(crate) async fn wait_processed(
    stamps: &Stamps,
    n: u64,
    limit: Duration,
    bar: &ProgressBar,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        let (done, last) = stamps.progress();
        bar.set_position(done);
        if done >= n {
            return Ok(last.unwrap_or_else(Instant::now));
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "only {done} of {n} messages processed after {}s; the pipeline is stuck or far slower than expected",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An inbox that tells [`Stamps`] when a message's transaction has
/// committed (after `commit` returns, so the figure includes the commit).
#[derive(Clone)]
pub(crate) struct TimedInbox<I> {
    pub(crate) inner: I,
    pub(crate) stamps: Arc<Stamps>,
}

/// The transaction of a [`TimedInbox`]: the backend's, plus the ids of the
/// new messages it applies (several with the consumer's group commit).
pub(crate) struct TimedTx<T> {
    pub(crate) tx: T,
    ids: Vec<Uuid>,
}

impl<I: InboxStore> InboxStore for TimedInbox<I> {
    type Tx = TimedTx<I::Tx>;

    async fn begin(&self) -> custody::Result<Self::Tx> {
        Ok(TimedTx {
            tx: self.inner.begin().await?,
            ids: Vec::new(),
        })
    }

    async fn record(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        message: &Message,
        now: DateTime<Utc>,
    ) -> custody::Result<InboxOutcome> {
        let outcomes = self.record_all(tx, consumer, &[message], now).await?;
        outcomes.first().copied().ok_or_else(|| {
            custody::Error::store(
                "bench inbox",
                "record",
                false,
                "record_all returned no outcome",
            )
        })
    }

    async fn record_all(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        messages: &[&Message],
        now: DateTime<Utc>,
    ) -> custody::Result<Vec<InboxOutcome>> {
        let outcomes = self
            .inner
            .record_all(&mut tx.tx, consumer, messages, now)
            .await?;
        for (message, outcome) in messages.iter().zip(&outcomes) {
            if *outcome == InboxOutcome::New {
                self.stamps.received(message.id);
                tx.ids.push(message.id);
            }
        }
        Ok(outcomes)
    }

    async fn start_attempts(
        &self,
        consumer: &str,
        run: Uuid,
        ids: &[Uuid],
        alone: bool,
        now: DateTime<Utc>,
    ) -> custody::Result<Vec<custody::Attempt>> {
        self.inner
            .start_attempts(consumer, run, ids, alone, now)
            .await
    }

    async fn finish_attempts(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        ids: &[Uuid],
    ) -> custody::Result<()> {
        self.inner.finish_attempts(&mut tx.tx, consumer, ids).await
    }

    async fn is_recorded(&self, consumer: &str, id: Uuid) -> custody::Result<bool> {
        self.inner.is_recorded(consumer, id).await
    }

    async fn commit(&self, tx: Self::Tx) -> custody::Result<()> {
        self.inner.commit(tx.tx).await?;
        for id in tx.ids {
            self.stamps.processed(id);
        }
        Ok(())
    }

    async fn dead_letter(&self, consumer: &str, dead: &DeadLetter) -> custody::Result<()> {
        self.inner.dead_letter(consumer, dead).await
    }

    async fn redrives(
        &self,
        consumer: &str,
        limit: usize,
    ) -> custody::Result<Vec<custody::Redrive>> {
        self.inner.redrives(consumer, limit).await
    }

    async fn finish_redrive(&self, tx: &mut Self::Tx, seq: i64) -> custody::Result<()> {
        self.inner.finish_redrive(&mut tx.tx, seq).await
    }

    async fn drop_redrive(&self, seq: i64) -> custody::Result<()> {
        self.inner.drop_redrive(seq).await
    }

    async fn prune(
        &self,
        consumer: &str,
        older_than: DateTime<Utc>,
        limit: usize,
    ) -> custody::Result<u64> {
        self.inner.prune(consumer, older_than, limit).await
    }

    async fn progress(&self, consumer: &str) -> custody::Result<Vec<custody::PartitionProgress>> {
        self.inner.progress(consumer).await
    }

    async fn accept_gap(
        &self,
        consumer: &str,
        gap: &custody::GapAcceptance,
        now: DateTime<Utc>,
    ) -> custody::Result<custody::AcceptedGap> {
        self.inner.accept_gap(consumer, gap, now).await
    }

    async fn compact(
        &self,
        consumer: &str,
        keep_after: DateTime<Utc>,
        limit: usize,
    ) -> custody::Result<custody::Compaction> {
        self.inner.compact(consumer, keep_after, limit).await
    }
}

// ---------------------------------------------------------------------------
// Load

/// Run `op(i)` for `i in 0..total` on `producers` concurrent tasks, each
/// one call at a time. With `rate` (messages/s over all producers) calls
/// are paced open-loop: call `i` starts no earlier than `start + i / rate`.
/// Returns the time from the start until the last call returned.
pub(crate) async fn drive<F, Fut>(
    producers: usize,
    total: u64,
    rate: Option<f64>,
    bar: &ProgressBar,
    op: F,
) -> anyhow::Result<Duration>
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let step = producers as u64;
    for p in 0..step {
        let op = op.clone();
        let bar = bar.clone();
        set.spawn(async move {
            let mut i = p;
            while i < total {
                if let Some(r) = rate.filter(|r| *r > 0.0) {
                    tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / r)).await;
                }
                op(i).await?;
                bar.inc(1);
                i += step;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.context("producer task panicked")??;
    }
    Ok(start.elapsed())
}

/// Messages of the warm-up before a measured phase (not reported).
pub(crate) fn warm_up(n: u64) -> u64 {
    (n / 10).clamp(1, 1000)
}

/// Warm up with `op` (`warm_up(n)` calls, the progress bar labelled
/// `warm`), then [`timed_rate`] of `n` calls: a ceiling's rate.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn warmed_rate<F, Fut>(
    report: &mut Report,
    producers: usize,
    n: u64,
    warm: &str,
    what: &str,
    name: &str,
    op: F,
) -> anyhow::Result<f64>
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let w = warm_up(n);
    drive(producers, w, None, &bar(w, warm), op.clone()).await?;
    timed_rate(report, producers, n, what, name, op).await
}

/// [`drive`] `op` for `n` messages as fast as `producers` producers go,
/// with a progress bar saying `what`; reports and returns the rate as `name`.
pub(crate) async fn timed_rate<F, Fut>(
    report: &mut Report,
    producers: usize,
    n: u64,
    what: &str,
    name: &str,
    op: F,
) -> anyhow::Result<f64>
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let b = bar(n, what);
    let meter = cpu::CpuMeter::start();
    let took = drive(producers, n, None, &b, op).await?;
    report.cpu(name, meter.stop(), n);
    b.finish_and_clear();
    Ok(report.rate(name, n, took))
}

/// What [`pipeline_phases`] measured.
pub(crate) struct Phases {
    /// End-to-end rate, saturated (msg/s).
    pub(crate) e2e: f64,
    /// Producer commit rate while the pipeline ran, saturated (msg/s).
    pub(crate) commits: f64,
    /// p99 commit→processed at 50% of `e2e` (ms).
    pub(crate) half_load_p99_ms: f64,
}

/// How long a phase may take before the run is declared stuck.
pub(crate) fn phase_limit(args: &BenchArgs) -> Duration {
    Duration::from_secs(if args.quick { 120 } else { 900 })
}

/// The two pipeline phases of `outbox` and `outbox-embedded`, with the
/// consumer and (if any) the relay already running and recording into
/// `stamps`. `op(i)` commits message `i` (business row + outbox message)
/// and calls `stamps.committed(id)` after the commit.
///
/// 1. warm-up (connections, caches), not reported;
/// 2. saturated: `n` messages from `--producers` producers as fast as they
///    commit; end to end = n ÷ (first commit started → last processed);
/// 3. 50% load: paced open-loop at half the saturated end-to-end rate for
///    5 s (quick) or 30 s, to show latency under normal load.
pub(crate) async fn pipeline_phases<F, Fut>(
    args: &BenchArgs,
    report: &mut Report,
    label: &str,
    stamps: &Arc<Stamps>,
    n: u64,
    op: F,
) -> anyhow::Result<Phases>
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let limit = phase_limit(args);
    let warm = warm_up(n);
    let b = bar(warm, &format!("{label}: warm-up"));
    drive(args.producers, warm, None, &b, op.clone()).await?;
    wait_processed(stamps, warm, limit, &b).await?;
    b.finish_and_clear();
    stamps.take_histogram()?;
    stamps.take_received()?;
    let base = stamps.progress().0;

    let b = bar(
        n,
        &format!("{label}: saturated, {} producers", args.producers),
    );
    let meter = cpu::CpuMeter::start();
    let start = Instant::now();
    let producing = drive(args.producers, n, None, &b, op.clone()).await?;
    b.set_message(format!("{label}: saturated, draining"));
    let last = wait_processed(stamps, base + n, limit, &b).await?;
    report.cpu(&format!("{label}: end to end, saturated"), meter.stop(), n);
    b.finish_and_clear();
    let commits = report.rate(
        &format!("{label}: producer commits (row + outbox), saturated"),
        n,
        producing,
    );
    let e2e = report.rate(
        &format!("{label}: end to end (commit → processed), saturated"),
        n,
        last.saturating_duration_since(start),
    );
    report.latency(Latency::from_micros(
        &format!("{label}: commit → processed, saturated"),
        &stamps.take_histogram()?,
    ));
    report.latency(Latency::from_micros(
        &format!("{label}: commit → in consumer's transaction, saturated"),
        &stamps.take_received()?,
    ));

    let half = args.load_rate.filter(|r| *r > 0.0).unwrap_or(e2e / 2.0);
    report.param("latency_phase_offered_per_s", half);
    let secs = if args.quick { 5.0 } else { 30.0 };
    let n2 = ((half * secs) as u64).max(100);
    let b = bar(n2, &format!("{label}: 50% load ({half:.0} msg/s)"));
    let start = Instant::now();
    drive(args.producers, n2, Some(half), &b, op).await?;
    let last = wait_processed(stamps, base + n + n2, limit, &b).await?;
    b.finish_and_clear();
    report.rate(
        &format!("{label}: end to end at 50% load (offered {half:.0}/s)"),
        n2,
        last.saturating_duration_since(start),
    );
    let lat = Latency::from_micros(
        &format!("{label}: commit → processed, 50% load"),
        &stamps.take_histogram()?,
    );
    let half_load_p99_ms = lat.p99_ms;
    report.latency(lat);
    report.latency(Latency::from_micros(
        &format!("{label}: commit → in consumer's transaction, 50% load"),
        &stamps.take_received()?,
    ));
    Ok(Phases {
        e2e,
        commits,
        half_load_p99_ms,
    })
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub(crate) fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_owned());
    if bar.is_hidden() {
        eprintln!("bench: {what} ({len})");
    }
    bar
}

/// The ordering key of message `i` (`keys` distinct keys).
pub(crate) fn key_of(i: u64, keys: u64) -> String {
    format!("key-{:04}", i % keys.max(1))
}

// ---------------------------------------------------------------------------
// Services

/// A pool of at most `max` connections to `url`.
pub(crate) async fn pg_pool(url: &str, max: u32) -> anyhow::Result<sqlx::PgPool> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max.max(1))
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await
        .with_context(|| {
            format!(
                "cannot connect to {}",
                custody_scenario::process::redact(url)
            )
        })
}

/// Raw async-nats JetStream publish-with-ack: `total` messages of the same
/// headers and payload as custody sends, at most `window` PubAcks
/// outstanding. Returns the elapsed time.
pub(crate) async fn raw_jetstream(
    client: &async_nats::Client,
    subject: &str,
    template: &Message,
    total: u64,
    window: usize,
) -> anyhow::Result<Duration> {
    use futures::StreamExt;
    let js = async_nats::jetstream::new(client.clone());
    let start = Instant::now();
    let publishes = futures::stream::iter(0..total).map(|_| {
        let js = js.clone();
        // copied per message, as the relay's publisher does
        let payload = template.payload.clone();
        let subject = subject.to_owned();
        // a fresh id per message, as the relay sends (JetStream dedupes by it)
        let mut msg = template.clone();
        msg.id = Uuid::now_v7();
        let headers = custody::nats::encode_headers(&msg);
        async move {
            js.publish_with_headers(subject, headers, payload.into())
                .await?
                .await?;
            anyhow::Ok(())
        }
    });
    let mut acks = publishes.buffer_unordered(window.max(1));
    while let Some(r) = acks.next().await {
        r.context("raw JetStream publish")?;
    }
    Ok(start.elapsed())
}

// ---------------------------------------------------------------------------
// Memory

/// This process's resident set size in MiB (VmRSS), if readable.
pub(crate) fn rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    status_kib(&s, "VmRSS:").map(|k| k as f64 / 1024.0)
}

fn status_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Samples [`rss_mib`] every 100 ms until stopped; keeps the maximum.
pub(crate) struct RssSampler {
    max: Arc<Mutex<f64>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    pub(crate) fn start() -> RssSampler {
        let max = Arc::new(Mutex::new(rss_mib().unwrap_or(0.0)));
        let stop = tokio_util::sync::CancellationToken::new();
        let (m, s) = (max.clone(), stop.clone());
        let task = tokio::spawn(async move {
            loop {
                if let Some(now) = rss_mib() {
                    let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
                    *g = g.max(now);
                }
                tokio::select! {
                    _ = s.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        });
        RssSampler { max, stop, task }
    }

    /// Stop sampling; the maximum seen (MiB).
    pub(crate) async fn stop(self) -> f64 {
        self.stop.cancel();
        let _ = self.task.await;
        let max = *self.max.lock().unwrap_or_else(|e| e.into_inner());
        max.max(rss_mib().unwrap_or(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_needs_a_positive_ceiling() {
        assert_eq!(ratio(80.0, 100.0), Some(0.8));
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(1.0, -3.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
    }

    #[test]
    fn targets() {
        assert_eq!(Target::RatioAtLeast(0.8).met(Some(0.8), 0.0), Some(true));
        assert_eq!(Target::RatioAtLeast(0.8).met(Some(0.79), 0.0), Some(false));
        assert_eq!(Target::RatioAtLeast(0.8).met(None, 0.0), None);
        assert_eq!(Target::AtMostMs(20.0).met(None, 20.0), Some(true));
        assert_eq!(Target::BelowMib(100.0).met(None, 100.0), Some(false));
        assert_eq!(Target::RateAtLeast(5.0).met(None, 5.0), Some(true));
        assert_eq!(Target::RateAtLeast(5.0).met(Some(9.0), 4.9), Some(false));
    }

    #[test]
    fn latency_percentiles_in_ms() -> anyhow::Result<()> {
        let mut h = new_histogram()?;
        for us in 1..=1000u64 {
            h.record(us * 1000)?; // 1 ms .. 1000 ms
        }
        let l = Latency::from_micros("x", &h);
        assert_eq!(l.count, 1000);
        assert!((l.p50_ms - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99_ms - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.p999_ms - 999.0).abs() < 1.0, "{l:?}");
        assert!((l.max_ms - 1000.0).abs() < 1.0, "{l:?}");
        Ok(())
    }

    #[test]
    fn table_shows_ratio_and_verdict() {
        let args = BenchArgs {
            scenario: Scenario::Outbox,
            quick: true,
            producers: 4,
            messages: None,
            load_rate: None,
            payload_bytes: 256,
            json: None,
            nats: String::new(),
            postgres: String::new(),
            no_sequence_numbers: false,
            notify_interval_ms: None,
            no_key_locks: false,
            poison_after: None,
        };
        let mut r = Report::new(&args);
        let e2e = r.rate("end to end", 1000, Duration::from_secs(2));
        assert_eq!(e2e, 500.0);
        r.compare(
            "end to end",
            e2e,
            "msg/s",
            Some(("PG commits", 1000.0)),
            Some(Target::RatioAtLeast(0.8)),
        );
        r.compare("p99", 12.5, "ms", None, Some(Target::AtMostMs(20.0)));
        let out = r.render();
        assert!(out.contains("0.50"), "{out}");
        assert!(out.contains("NO"), "{out}");
        assert!(out.contains("yes"), "{out}");
        assert!(out.contains("PG commits 1000 msg/s"), "{out}");
        assert!(out.contains(TARGETS_ARE_INFORMATIONAL), "{out}");
        assert_eq!(r.comparisons[0].met, Some(false));
        assert_eq!(r.comparisons[1].met, Some(true));
    }

    #[tokio::test]
    async fn stamps_match_either_order() -> anyhow::Result<()> {
        let s = Stamps::new()?;
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        s.committed(a);
        s.processed(a);
        s.processed(b); // consumer first: recorded as 0 when the producer reports
        s.committed(b);
        assert_eq!(s.histogram().len(), 2);
        assert_eq!(s.progress().0, 2);
        Ok(())
    }

    #[test]
    fn vmrss_parses() {
        assert_eq!(
            status_kib("Name:\tx\nVmRSS:\t   2048 kB\n", "VmRSS:"),
            Some(2048)
        );
    }

    #[test]
    fn long_row_names_widen_the_column_instead_of_breaking_rows() {
        let mut out = String::new();
        let long = "relay drain, 16 producers, PostgreSQL → NATS JetStream with sequence numbers";
        table(
            &mut out,
            &["figure", "value", "met"],
            vec![
                vec![long.to_owned(), "12 msg/s".to_owned(), "NO".to_owned()],
                vec!["p99".to_owned(), "1.50 ms".to_owned(), "yes".to_owned()],
            ],
        );
        let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 3, "{out}");
        // each row on one line, its columns ending where the heading's do
        let ends = |l: &str, word: &str| {
            l.find(word)
                .map(|i| l[..i].chars().count() + word.chars().count())
        };
        assert_eq!(ends(lines[0], "value"), ends(lines[1], "msg/s"), "{out}");
        assert_eq!(ends(lines[0], "value"), ends(lines[2], "ms"), "{out}");
        assert_eq!(ends(lines[0], "met"), ends(lines[1], "NO"), "{out}");
        assert_eq!(ends(lines[0], "met"), ends(lines[2], "yes"), "{out}");
        assert!(lines[1].starts_with(long), "{out}");
    }
}
