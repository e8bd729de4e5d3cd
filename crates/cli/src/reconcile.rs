//! `custody reconcile`: balancing controls between a producer's outbox and a
//! consumer's inbox (docs/OPERATIONS.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Args;
use custody::reconcile::{export_report, reconcile, Progress};
use custody::{Admin, ReconcileQuery, ReconcileReport};
use indicatif::{ProgressBar, ProgressStyle};
use uuid::Uuid;

use crate::ops::{consumers_hint, open_existing, redact, shutdown_token, topics_hint};

mod live;

/// `custody reconcile`.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// The producer's database (its outbox history): `postgres://…` or a SQLite file.
    /// Optional with `--live` (then only gaps between numbers the consumer has are seen).
    #[arg(long, required_unless_present = "live", value_name = "URL")]
    pub producer: Option<String>,
    /// The consumer's database (its inbox): `postgres://…` or a SQLite file.
    #[arg(long, value_name = "URL")]
    pub consumer: String,
    /// The consumer's name in its inbox (`ConsumerConfig::name`).
    #[arg(long, value_name = "NAME")]
    pub consumer_name: String,
    /// The topic to reconcile (with `--live`: every topic the consumer has numbers of).
    #[arg(long, required_unless_present = "live", value_name = "TOPIC")]
    pub topic: Option<String>,
    /// Check by sequence numbers instead of id windows: the consumer's per-partition floors
    /// and gaps, and with `--producer` the numbers it gave since (docs/SEQUENCES.md).
    /// `--repair` republishes the missing numbers' messages.
    #[arg(long, conflicts_with_all = ["from", "to", "window", "embedded_subscription"])]
    pub live: bool,
    /// With `--live`: gaps younger than this are in flight, not missing (keys publish
    /// concurrently, and a redelivery takes up to the transport's ack wait).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s", value_name = "DURATION")]
    pub grace: Duration,
    /// Start of the range: RFC 3339 (`2026-11-21T10:00:00Z`) or a duration ago (`6h`).
    /// Default `23h` (inside the default 24 h outbox retention).
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,
    /// End of the range, same forms. Default: now minus `--settle`.
    #[arg(long, value_name = "TIME")]
    pub to: Option<String>,
    /// Without `--to`, messages younger than this are in flight and not checked.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1m", value_name = "DURATION")]
    pub settle: Duration,
    /// Window length: digests are compared per window, ids listed only for windows that differ.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h", value_name = "DURATION")]
    pub window: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Re-send the missing messages through the normal path, then check again: put their outbox
    /// rows back to pending for the relay (a running relay republishes them), or with
    /// `--embedded-subscription` rewind that reader's checkpoint.
    #[arg(long)]
    pub repair: bool,
    /// The consumer reads the producer's outbox directly (embedded transport) under this
    /// subscription name; `--repair` rewinds it (stop the consumer first, start it after).
    #[arg(long, value_name = "NAME")]
    pub embedded_subscription: Option<String>,
    /// How long `--repair` waits for the gap to close before the second report.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s", value_name = "DURATION")]
    pub repair_wait: Duration,
    /// Reconcile every interval until stopped (SIGINT/SIGTERM); logs a warning per gap and exports
    /// gap counts as gauges.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub watch: Option<Duration>,
    /// With `--watch`: also write the gauges in Prometheus text format to this file after every
    /// round (e.g. for node_exporter's textfile collector).
    #[arg(long, value_name = "FILE")]
    pub metrics_file: Option<PathBuf>,
    /// With `--watch`: also serve the gauges in Prometheus format on this address
    /// (e.g. `127.0.0.1:9465`).
    #[arg(long, requires = "watch", value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// With `--live`: raise the consumer's floor past numbers that will never arrive, with an
    /// audit record: `[PRODUCER/]TOPIC/PARTITION/FIRST-LAST` (or `…/N`, or `…/start` for a
    /// stream that did not begin at 1). Every missing number from the floor up to LAST must be
    /// named. Needs `--reason`. The only write `reconcile` makes (docs/OPERATIONS.md).
    #[arg(long, requires_all = ["live", "reason"], conflicts_with_all = ["repair", "watch"], value_name = "RANGE")]
    pub accept: Option<String>,
    /// With `--accept`: why the numbers are accepted as lost (kept in the audit record).
    #[arg(long, requires = "accept", value_name = "TEXT")]
    pub reason: Option<String>,
    /// The producer is an event store published by `custody relay --from-events`: compare the
    /// consumer with the event log and that log relay's journal instead of an outbox. Pass the
    /// relay's `--category` and `--topic` flags too (docs/EVENTSTORE.md, "Publishing the event log").
    #[arg(long, conflicts_with_all = ["live", "embedded_subscription"])]
    pub from_events: bool,
    /// With `--from-events`: the log relay's name (`custody relay --from-events --name`).
    #[arg(
        long,
        requires = "from_events",
        default_value = "events",
        value_name = "NAME"
    )]
    pub log_relay: String,
    /// With `--from-events`: a category the log relay publishes (repeat; none: the whole log).
    #[arg(long = "category", requires = "from_events", value_name = "CATEGORY")]
    pub categories: Vec<String>,
    /// With `--from-events`: the `--topic` the log relay was run with, if any (every event
    /// on it); without, an event's topic is its stream's category.
    #[arg(long, requires = "from_events", value_name = "TOPIC")]
    pub relay_topic: Option<String>,
    /// With `--accept`: who accepts them (default: `$USER`).
    #[arg(long, requires = "accept", value_name = "NAME")]
    pub accepted_by: Option<String>,
}

/// The names given must be ones the databases have seen: a mistyped
/// `--consumer-name` or `--topic` compares nothing with nothing, and must
/// not come out as OK.
async fn check_names(
    args: &ReconcileArgs,
    producer: Option<&dyn Admin>,
    consumer: &dyn Admin,
) -> anyhow::Result<()> {
    if !consumer.consumer_seen(&args.consumer_name).await? {
        anyhow::bail!(
            "consumer {:?} has never recorded a message in consumer database {}{}; check --consumer-name (the consumer's ConsumerConfig::name) and --consumer. A consumer that has processed nothing yet has nothing to reconcile",
            args.consumer_name,
            redact(&args.consumer),
            consumers_hint(consumer).await
        );
    }
    if args.live {
        return Ok(());
    }
    let Some(topic) = &args.topic else {
        return Ok(());
    };
    if let Some(p) = producer {
        if p.topic_seen(topic).await? {
            return Ok(());
        }
    }
    if consumer.topic_seen(topic).await? {
        return Ok(());
    }
    let (hint, where_) = match (producer, &args.producer) {
        (Some(p), Some(url)) => (
            topics_hint(p).await,
            format!(
                "producer database {} nor in consumer database {}",
                redact(url),
                redact(&args.consumer)
            ),
        ),
        _ => (
            topics_hint(consumer).await,
            format!("consumer database {}", redact(&args.consumer)),
        ),
    };
    anyhow::bail!("topic {topic:?} was never seen in {where_}{hint}; check --topic")
}

/// Parse `--from` / `--to`: RFC 3339, or a duration meaning "that long ago".
pub fn parse_time(s: &str, now: DateTime<Utc>) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(now - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)),
        Err(_) => anyhow::bail!(
            "{s:?} is neither an RFC 3339 time (2026-11-21T10:00:00Z) nor a duration ago (6h, 30m)"
        ),
    }
}

fn range(args: &ReconcileArgs) -> anyhow::Result<(DateTime<Utc>, DateTime<Utc>)> {
    let now = Utc::now();
    let to = match &args.to {
        Some(t) => parse_time(t, now).context("--to")?,
        None => now - chrono::Duration::from_std(args.settle).unwrap_or_default(),
    };
    let from = parse_time(args.from.as_deref().unwrap_or("23h"), now).context("--from")?;
    if from >= to {
        anyhow::bail!("--from ({from}) must be before --to ({to})");
    }
    Ok((from, to))
}

fn progress_bar(json: bool) -> ProgressBar {
    // hidden automatically when stderr is not a terminal
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(1000)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:<34} [{bar:30}] {elapsed_precise}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

async fn run_once(
    sent: &dyn custody::DynSentHistory,
    consumer: &dyn Admin,
    q: &ReconcileQuery,
    json: bool,
) -> anyhow::Result<ReconcileReport> {
    let bar = progress_bar(json);
    let b = bar.clone();
    let progress = move |p: Progress| {
        b.set_message(format!("{} ids read: {}", p.phase, p.rows));
        b.set_position((p.fraction * 1000.0) as u64);
    };
    let r = reconcile(sent, consumer.processed(), q, &progress).await;
    bar.finish_and_clear();
    Ok(r?)
}

/// `custody reconcile`.
pub async fn run(args: ReconcileArgs) -> anyhow::Result<ExitCode> {
    // never create or migrate what is checked (docs/ARCHITECTURE.md invariant 8)
    let producer = match &args.producer {
        Some(url) => Some(open_existing("producer database", url).await?),
        None => None,
    };
    let consumer = open_existing("consumer database", &args.consumer).await?;
    let consumer = consumer.as_ref();
    check_names(&args, producer.as_deref(), consumer).await?;
    if let (Some(addr), Some(_)) = (args.metrics_addr, args.watch) {
        crate::ops::serve_metrics(addr)?;
    }
    if args.live {
        if consumer
            .processed()
            .sequence_progress(&args.consumer_name)
            .await?
            .is_empty()
        {
            // a live check of a consumer without numbers compares nothing
            anyhow::bail!(
                "consumer {:?} has no numbered message in consumer database {}: --live compares sequence numbers, which relays give when relay.sequence-numbers is on (docs/SEQUENCES.md). Reconcile it by ids instead: --producer … --topic …",
                args.consumer_name,
                redact(&args.consumer)
            );
        }
        return live::run(&args, producer.as_deref(), consumer).await;
    }
    let (Some(producer), Some(topic)) = (producer.as_deref(), args.topic.clone()) else {
        anyhow::bail!("--producer and --topic are required (or use --live)");
    };
    // the sent side: the producer's outbox, or its event log as published by a log relay
    let events_sent = match (&args.from_events, &args.producer) {
        (true, Some(url)) => {
            let log = crate::ops::log_relay_config(
                &args.log_relay,
                &args.categories,
                args.relay_topic.as_deref(),
            );
            Some(custody::log_relay::open_event_history(url, log).await?)
        }
        _ => None,
    };
    let sent: &dyn custody::DynSentHistory = match &events_sent {
        Some(h) => h.as_ref(),
        None => producer.sent(),
    };
    if let Some(every) = args.watch {
        return watch(&args, &topic, sent, consumer, every).await;
    }
    let (from, to) = range(&args)?;
    let q = ReconcileQuery {
        topic,
        consumer: args.consumer_name.clone(),
        from,
        to,
        window: args.window,
    };
    let report = run_once(sent, consumer, &q, args.json).await?;
    if !args.repair || report.missing.is_empty() {
        print(&report, &args, args.json);
        return Ok(exit_code(&report));
    }
    if !args.json {
        print(&report, &args, false);
    }
    let what = match &args.embedded_subscription {
        Some(sub) => {
            let at = producer.rewind_checkpoint(sub, &report.missing).await?;
            match at {
                Some(p) => format!(
                    "rewound subscription {sub:?} to position {p}; (re)start its consumer: it delivers the rest again and its inbox skips what it has"
                ),
                None => format!(
                    "subscription {sub:?} is already before the missing messages (or has no checkpoint); its consumer has not read them yet"
                ),
            }
        }
        None => {
            let n = sent.republish(&report.missing).await?;
            format!(
                "put {n} of {} missing messages back to pending; a running relay republishes them (others are still pending or were pruned)",
                report.missing.len()
            )
        }
    };
    if !args.json {
        println!("\nrepair: {what}");
        println!(
            "waiting up to {} for the gap to close…",
            humantime::format_duration(args.repair_wait)
        );
    }
    let deadline = tokio::time::Instant::now() + args.repair_wait;
    let after = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let r = run_once(sent, consumer, &q, true).await?;
        if r.missing.is_empty() || tokio::time::Instant::now() >= deadline {
            break r;
        }
    };
    if args.json {
        let v = serde_json::json!({ "before": report, "repair": what, "after": after });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("\nafter repair:");
        print(&after, &args, false);
        if !after.missing.is_empty() {
            println!(
                "still missing after {}: is a relay running on the producer's outbox (or, embedded, was the consumer restarted)? Run again with a longer --repair-wait, or check `custody trace ID`",
                humantime::format_duration(args.repair_wait)
            );
        }
    }
    Ok(exit_code(&after))
}

/// 0 clean, 1 something missing, 2 nothing missing but unexpected ids,
/// 3 nothing compared (no message of the topic in the range on either side).
fn exit_code(r: &ReconcileReport) -> ExitCode {
    if !r.missing.is_empty() {
        ExitCode::from(1)
    } else if !r.unexpected.is_empty() {
        ExitCode::from(2)
    } else if r.compared_nothing() {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

/// What the range left out, and how to include it: "left out 12 messages
/// younger than 1m; pass --settle 0s to include them".
fn left_out_note(r: &ReconcileReport, args: &ReconcileArgs) -> Option<String> {
    if r.left_out == 0 {
        return None;
    }
    Some(match &args.to {
        None => format!(
            "left out {} message(s) younger than {}; pass --settle 0s to include them",
            r.left_out,
            humantime::format_duration(args.settle)
        ),
        Some(to) => format!(
            "left out {} message(s) sent after --to {to}; move --to later to include them",
            r.left_out
        ),
    })
}

async fn watch(
    args: &ReconcileArgs,
    topic: &str,
    sent: &dyn custody::DynSentHistory,
    consumer: &dyn Admin,
    every: Duration,
) -> anyhow::Result<ExitCode> {
    range(args)?; // a bad --from / --to stops here, not at every round
    every_round(every, || async {
        let (from, to) = range(args)?;
        let q = ReconcileQuery {
            topic: topic.to_owned(),
            consumer: args.consumer_name.clone(),
            from,
            to,
            window: args.window,
        };
        let r = run_once(sent, consumer, &q, true).await?;
        export_report(&r);
        if let Some(path) = &args.metrics_file {
            if let Err(e) = write_metrics(path, &r) {
                tracing::warn!(path = %path.display(), error = %e, "cannot write metrics file");
            }
        }
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{} {}..{}: windows {} (mismatching {}), sent {}, processed {}, missing {}, unexpected {}, dead-lettered {}, left out {}{}",
                Utc::now().format("%Y-%m-%dT%H:%M:%SZ"),
                r.from.format("%Y-%m-%dT%H:%M:%SZ"),
                r.to.format("%Y-%m-%dT%H:%M:%SZ"),
                r.windows_checked,
                r.mismatching,
                r.sent,
                r.processed,
                r.missing.len(),
                r.unexpected.len(),
                r.dead_lettered.len(),
                r.left_out,
                if r.compared_nothing() { " (nothing compared)" } else { "" }
            );
        }
        Ok(exit_code(&r))
    })
    .await
}

/// Run `round` every `every` until SIGINT / SIGTERM and return the last
/// round's exit status. A failed round is logged and tried again at the next
/// interval (`--watch` of both kinds of reconciliation).
async fn every_round<F, Fut>(every: Duration, mut round: F) -> anyhow::Result<ExitCode>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    let cancel = shutdown_token();
    let mut last = ExitCode::SUCCESS;
    loop {
        match round().await {
            Ok(code) => last = code,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reconcile round failed; retrying at the next interval")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(last),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Prometheus text exposition of a report's gauges, written atomically.
fn write_metrics(path: &std::path::Path, r: &ReconcileReport) -> anyhow::Result<()> {
    use custody::metric_definitions as m;
    let (t, c) = (esc(&r.topic), esc(&r.consumer));
    let mut out = format!(
        "# HELP {g} Gaps found by the last reconciliation.\n# TYPE {g} gauge\n",
        g = m::RECONCILE_GAPS
    );
    for (kind, n) in [
        ("missing", r.missing.len()),
        ("unexpected", r.unexpected.len()),
        ("dead_lettered", r.dead_lettered.len()),
    ] {
        out.push_str(&format!(
            "{}{{topic=\"{t}\",consumer=\"{c}\",kind=\"{kind}\"}} {n}\n",
            m::RECONCILE_GAPS
        ));
    }
    out.push_str(&format!(
        "# HELP {w} Windows checked by the last reconciliation.\n# TYPE {w} gauge\n",
        w = m::RECONCILE_WINDOWS
    ));
    for (result, n) in [("matching", r.matching), ("mismatching", r.mismatching)] {
        out.push_str(&format!(
            "{}{{topic=\"{t}\",consumer=\"{c}\",result=\"{result}\"}} {n}\n",
            m::RECONCILE_WINDOWS
        ));
    }
    write_atomically(path, &out)
}

/// Write a metrics file so a reader (node_exporter's textfile collector)
/// never sees half of it: a temporary file, then a rename.
fn write_atomically(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Prometheus label value escaping.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn print(r: &ReconcileReport, args: &ReconcileArgs, json: bool) {
    if json {
        match serde_json::to_string_pretty(r) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: report does not serialize: {e}"),
        }
        return;
    }
    let ts = |t: DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    println!(
        "reconcile topic {:?}, consumer {:?}: {} .. {}, windows of {}",
        r.topic,
        r.consumer,
        ts(r.from),
        ts(r.to),
        humantime::format_duration(Duration::from_secs(r.window_secs))
    );
    let show_all = r.windows.len() <= 48;
    println!("  {:<22} {:>10} {:>10}", "window", "sent", "processed");
    for w in r.windows.iter().filter(|w| show_all || !w.matching) {
        println!(
            "  {:<22} {:>10} {:>10}  {}",
            ts(w.start),
            w.sent,
            w.processed,
            if w.matching { "ok" } else { "MISMATCH" }
        );
    }
    println!(
        "windows checked {}, matching {}, mismatching {}",
        r.windows_checked, r.matching, r.mismatching
    );
    println!("sent {}, processed {}", r.sent, r.processed);
    let note = left_out_note(r, args);
    if let Some(note) = &note {
        println!("{note}");
    }
    let list = |title: &str, ids: &[Uuid]| {
        println!("{title}: {}", ids.len());
        for id in ids.iter().take(50) {
            println!("  {id}");
        }
        if ids.len() > 50 {
            println!("  … {} more (--json lists all)", ids.len() - 50);
        }
    };
    list("missing (sent, never processed)", &r.missing);
    list(
        "unexpected (processed, never sent by this producer)",
        &r.unexpected,
    );
    println!("dead-lettered (accounted for): {}", r.dead_lettered.len());
    for d in r.dead_lettered.iter().take(50) {
        println!("  {}  {:<8}  {}", d.id, d.side, d.error);
    }
    if !r.redriving.is_empty() {
        list("being redriven (accounted for)", &r.redriving);
    }
    if r.compared_nothing() {
        println!(
            "RESULT: NOTHING COMPARED — neither side has a message of topic {:?} between {} and {}{}; this proves nothing (exit status 3)",
            r.topic,
            ts(r.from),
            ts(r.to),
            note.map(|n| format!("; {n}")).unwrap_or_default()
        );
    } else if r.is_clean() {
        println!("RESULT: OK — every message sent was processed or dead-lettered");
    } else if !r.missing.is_empty() {
        println!(
            "RESULT: {} MISSING — `custody reconcile … --repair` re-sends them; `custody trace ID` shows where one stopped",
            r.missing.len()
        );
    } else {
        println!(
            "RESULT: {} UNEXPECTED — processed but not in this producer's history (another producer on the topic, or its history was pruned: keep --from within the outbox retention)",
            r.unexpected.len()
        );
    }
}
