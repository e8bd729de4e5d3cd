//! `custody reconcile --live`: gaps by sequence numbers (docs/SEQUENCES.md).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use custody::live::{export_live, reconcile_live, LiveReport};
use custody::{Admin, GapAcceptance, GapRange};

use super::{esc, every_round, write_atomically, ReconcileArgs};

async fn check(
    args: &ReconcileArgs,
    producer: Option<&dyn Admin>,
    consumer: &dyn Admin,
) -> anyhow::Result<LiveReport> {
    Ok(reconcile_live(
        producer.map(|p| p.sent()),
        consumer.processed(),
        &args.consumer_name,
        args.grace,
        Utc::now(),
    )
    .await?)
}

/// Run the live check once (with `--repair`: repair and check again), or
/// every `--watch` interval.
pub async fn run(
    args: &ReconcileArgs,
    producer: Option<&dyn Admin>,
    consumer: &dyn Admin,
) -> anyhow::Result<ExitCode> {
    if let Some(every) = args.watch {
        return watch(args, producer, consumer, every).await;
    }
    if let Some(spec) = &args.accept {
        accept(args, spec, consumer).await?;
    }
    let report = check(args, producer, consumer).await?;
    let ids = report.republishable();
    let (Some(producer), true, false) = (producer, args.repair, ids.is_empty()) else {
        print(&report, args.json);
        if args.repair && !report.is_clean() {
            eprintln!(
                "nothing to republish: {}",
                if producer.is_none() {
                    "give --producer so the missing numbers can be resolved to messages"
                } else {
                    "the producer no longer has the missing numbers as published rows (pruned, or still pending at the relay)"
                }
            );
        }
        return Ok(exit_code(&report));
    };
    if !args.json {
        print(&report, false);
    }
    let n = producer.sent().republish(&ids).await?;
    let what = format!(
        "put {n} of {} missing messages back to pending; a running relay republishes them under their old numbers",
        report.missing.len()
    );
    if !args.json {
        println!("\nrepair: {what}");
        println!(
            "waiting up to {} for the gaps to close…",
            humantime::format_duration(args.repair_wait)
        );
    }
    // done when every repaired number is recorded by the consumer (right
    // after the repair the rows are pending again, which reads as in flight)
    let repaired: Vec<_> = report
        .missing
        .iter()
        .filter(|m| m.id.is_some_and(|id| ids.contains(&id)))
        .cloned()
        .collect();
    let deadline = tokio::time::Instant::now() + args.repair_wait;
    let (after, arrived) = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let r = check(args, Some(producer), consumer).await?;
        let arrived = repaired.iter().all(|m| r.has_recorded(m));
        if (r.is_clean() && arrived) || tokio::time::Instant::now() >= deadline {
            break (r, arrived);
        }
    };
    if args.json {
        let v = serde_json::json!({
            "before": report, "repair": what, "after": after, "repaired_arrived": arrived,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("\nafter repair:");
        print(&after, false);
        if !arrived {
            println!(
                "the repaired messages have not reached the consumer after {}: is a relay running on the producer's outbox? Run again with a longer --repair-wait, or check `custody trace ID`",
                humantime::format_duration(args.repair_wait)
            );
        }
    }
    Ok(if arrived {
        exit_code(&after)
    } else {
        ExitCode::from(1)
    })
}

/// `--accept [PRODUCER/]TOPIC/PARTITION/FIRST-LAST|N|start`: parse, find the
/// producer when not named (the one the consumer has that partition of),
/// raise the floor with an audit record, print what was accepted.
async fn accept(args: &ReconcileArgs, spec: &str, consumer: &dyn Admin) -> anyhow::Result<()> {
    let parts: Vec<&str> = spec.split('/').collect();
    let (producer, topic, partition, range) = match parts.as_slice() {
        [t, p, r] => (None, *t, *p, *r),
        [id, t, p, r] => (Some(*id), *t, *p, *r),
        _ => anyhow::bail!(
            "--accept {spec:?}: expected [PRODUCER/]TOPIC/PARTITION/FIRST-LAST (or …/N, or …/start), e.g. orders/3/1041-1043"
        ),
    };
    let partition: u32 = partition
        .parse()
        .with_context(|| format!("--accept {spec:?}: partition {partition:?} is not a number"))?;
    let number = |s: &str| -> anyhow::Result<u64> {
        s.trim()
            .parse()
            .with_context(|| format!("--accept {spec:?}: {s:?} is not a sequence number"))
    };
    let range = if range == "start" {
        GapRange::StreamStart
    } else if let Some((a, b)) = range.split_once('-') {
        GapRange::Numbers {
            first: number(a)?,
            last: number(b)?,
        }
    } else {
        let n = number(range)?;
        GapRange::Numbers { first: n, last: n }
    };
    let producer = match producer {
        Some(p) => p.to_owned(),
        None => {
            let progress = consumer
                .processed()
                .sequence_progress(&args.consumer_name)
                .await?;
            let mut ids: Vec<String> = progress
                .into_iter()
                .filter(|p| p.topic == topic && p.partition == partition)
                .map(|p| p.producer)
                .collect();
            ids.dedup();
            match ids.as_slice() {
                [one] => one.clone(),
                [] => anyhow::bail!(
                    "consumer {:?} has no record of topic {topic:?} partition {partition}: nothing to accept (check the names; `custody reconcile --live` lists what it has)",
                    args.consumer_name
                ),
                many => anyhow::bail!(
                    "consumer {:?} has topic {topic:?} partition {partition} from several producers ({}): name one, PRODUCER/{topic}/{partition}/…",
                    args.consumer_name,
                    many.join(", ")
                ),
            }
        }
    };
    let by = match &args.accepted_by {
        Some(b) => b.clone(),
        None => std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .map_err(|_| {
                anyhow::anyhow!("--accept: say who accepts the gap with --accepted-by (no $USER)")
            })?,
    };
    let gap = GapAcceptance {
        producer,
        topic: topic.to_owned(),
        partition,
        range,
        by,
        reason: args.reason.clone().unwrap_or_default(),
    };
    let now = Utc::now();
    let done = consumer
        .accept_gap(&args.consumer_name, &gap, now)
        .await
        .with_context(|| format!("accept {spec}"))?;
    let line = format!(
        "accepted as lost: {} number(s) {} of producer {} {}/{} (floor {} -> {}), by {:?}: {:?}",
        done.count(),
        custody::sequence::runs_text(&done.missing),
        gap.producer,
        gap.topic,
        gap.partition,
        done.old_floor,
        done.new_floor,
        gap.by,
        gap.reason
    );
    tracing::warn!(consumer = %args.consumer_name, "{line}");
    if args.json {
        eprintln!("{line}");
    } else {
        println!("{line}\n");
    }
    Ok(())
}

async fn watch(
    args: &ReconcileArgs,
    producer: Option<&dyn Admin>,
    consumer: &dyn Admin,
    every: Duration,
) -> anyhow::Result<ExitCode> {
    every_round(every, || async {
        let r = check(args, producer, consumer).await?;
        export_live(&r);
        if let Some(path) = &args.metrics_file {
            if let Err(e) = write_metrics(path, &r) {
                tracing::warn!(path = %path.display(), error = %e, "cannot write metrics file");
            }
        }
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{} consumer {:?}: {} partitions, {} missing, {} in flight",
                r.checked_at.format("%Y-%m-%dT%H:%M:%SZ"),
                r.consumer,
                r.partitions.len(),
                r.missing.len(),
                r.in_flight
            );
        }
        Ok(exit_code(&r))
    })
    .await
}

fn exit_code(r: &LiveReport) -> ExitCode {
    if r.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn print(r: &LiveReport, json: bool) {
    if json {
        match serde_json::to_string_pretty(r) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: report does not serialize: {e}"),
        }
        return;
    }
    println!(
        "live reconcile, consumer {:?}{}: gaps older than {} are missing",
        r.consumer,
        r.producer
            .as_ref()
            .map(|p| format!(", producer {p}"))
            .unwrap_or_default(),
        humantime::format_duration(Duration::from_secs_f64(r.grace_secs))
    );
    println!(
        "  {:<20} {:>5} {:>10} {:>10} {:>7} {:>10} {:>8}",
        "topic", "part", "floor", "highest", "holes", "producer", "behind"
    );
    for p in &r.partitions {
        let g = &p.progress;
        println!(
            "  {:<20} {:>5} {:>10} {:>10} {:>7} {:>10} {:>8}",
            g.topic,
            g.partition,
            g.floor,
            g.high,
            g.holes,
            p.producer_head
                .map(|h| h.to_string())
                .unwrap_or_else(|| "-".into()),
            p.behind
        );
    }
    println!("in flight (younger than the grace): {}", r.in_flight);
    println!("missing: {}", r.missing.len());
    for m in r.missing.iter().take(50) {
        println!(
            "  {} {}/{} #{} {}{}",
            m.kind,
            m.topic,
            m.partition,
            m.seq,
            m.id.map(|i| i.to_string())
                .unwrap_or_else(|| "(id unknown: give --producer)".into()),
            m.outbox_status
                .as_ref()
                .map(|s| format!(" ({s} at the producer)"))
                .unwrap_or_default()
        );
    }
    if r.missing.len() > 50 {
        println!("  … {} more (--json lists all)", r.missing.len() - 50);
    }
    if r.is_clean() {
        println!("RESULT: OK — no number is missing");
    } else {
        println!(
            "RESULT: {} MISSING — `custody reconcile --live --producer … --repair` republishes them; `custody trace ID` shows where one stopped",
            r.missing.len()
        );
    }
}

/// The live gauges in Prometheus text format, written atomically (tmp + rename).
fn write_metrics(path: &std::path::Path, r: &LiveReport) -> anyhow::Result<()> {
    let name = custody::metric_definitions::RECONCILE_LIVE_MISSING;
    let mut out = format!(
        "# HELP {name} Missing sequence numbers found by the last live reconciliation.\n# TYPE {name} gauge\n"
    );
    for kind in ["hole", "tail"] {
        let n = r.missing.iter().filter(|m| m.kind == kind).count();
        out.push_str(&format!(
            "{name}{{consumer=\"{}\",kind=\"{kind}\"}} {n}\n",
            esc(&r.consumer)
        ));
    }
    write_atomically(path, &out)
}
