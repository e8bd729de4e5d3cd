//! `custody trace ID`: one message's timeline across the databases given.

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::Args;
use custody::{MessageStatus, Stage};
use uuid::Uuid;

use crate::ops::{open_existing, redact};

/// `custody trace`.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The message id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// A database to look in (`postgres://…` or a SQLite file): the producer's and each
    /// consumer's. Repeat the flag for several.
    #[arg(long = "db", required = true, value_name = "URL")]
    pub dbs: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The status of `id` in one database (opened as it is: never created or
/// migrated).
pub async fn status_in(url: &str, id: Uuid) -> anyhow::Result<MessageStatus> {
    let db = open_existing("database", url).await?;
    db.status(id)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", redact(url)))
}

/// `custody trace`.
pub async fn run(args: TraceArgs) -> anyhow::Result<ExitCode> {
    let id = Uuid::parse_str(args.id.trim()).map_err(|e| {
        anyhow::anyhow!(
            "{:?} is not a message id ({e}); message ids are UUIDs such as 01936b2e-1f3a-7cc0-8a51-3f1e5d0c9b7a",
            args.id
        )
    })?;
    let mut st = MessageStatus::new(id);
    for url in &args.dbs {
        let s = status_in(url, id).await?;
        st.merge(s);
        // an event of the database's event store: stream, version, position, published or not
        if let Some(event) = custody::log_relay::event_status(url, id)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the event store of {}: {e}", redact(url)))?
        {
            st.merge(event);
        }
    }
    let stage = st.stage();
    if args.json {
        let v = serde_json::json!({ "stage": stage, "status": st });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print(&st);
    }
    if stage == Stage::Unknown {
        eprintln!(
            "message {id} is in none of the {} database(s) given: it was never enqueued there, or its history was pruned after the retention. Pass the producer's and the consumers' databases with --db",
            args.dbs.len()
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn ts(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

fn print(st: &MessageStatus) {
    println!("message {}: {}", st.id, st.stage());
    let mut events: Vec<(DateTime<Utc>, String)> = Vec::new();
    if let Some(p) = &st.producer {
        events.push((
            p.enqueued_at,
            format!(
                "enqueued     topic {:?}, key {:?}, type {}, outbox position {} (created {})",
                p.topic,
                p.key,
                p.message_type,
                p.position,
                ts(p.created_at)
            ),
        ));
        match p.status.as_str() {
            "published" => {
                let at = p.published_at.unwrap_or(p.enqueued_at);
                events.push((
                    at,
                    format!(
                        "published    {}{}{}",
                        p.publish_ref
                            .as_deref()
                            .map(|r| format!("transport ack {r}"))
                            .unwrap_or_else(|| "acknowledged by the transport".into()),
                        if p.republished > 0 {
                            format!(" (republished {}×)", p.republished)
                        } else {
                            String::new()
                        },
                        p.sequence
                            .map(|n| format!(", sequence number {n}"))
                            .unwrap_or_default()
                    ),
                ));
            }
            // with the embedded transport no relay publishes: consumers
            // read pending rows straight from the outbox
            "pending" if st.consumers.is_empty() => {
                let next = match p.retry_at {
                    Some(r) => format!(", next attempt at {}", ts(r)),
                    None => ", next attempt as soon as a relay reaches it (embedded transport: when the consumer reads it)".into(),
                };
                events.push((
                    Utc::now(),
                    format!(
                        "pending      {} failed attempt(s){next}{}",
                        p.attempts,
                        p.last_error
                            .as_deref()
                            .map(|e| format!("; last error: {e}"))
                            .unwrap_or_default()
                    ),
                ));
            }
            _ => {}
        }
    }
    for c in &st.consumers {
        let verb = if c.dead { "settled    " } else { "processed  " };
        events.push((
            c.processed_at,
            format!(
                "{verb}  by {:?}{}{}",
                c.consumer,
                if c.dead { " (dead-lettered)" } else { "" },
                if c.duplicates > 0 {
                    format!(", {} duplicate deliveries skipped", c.duplicates)
                } else {
                    String::new()
                }
            ),
        ));
    }
    for d in &st.dead {
        events.push((
            d.dead_at,
            format!(
                "dead         by {} after {} attempt(s): {}",
                d.origin, d.attempts, d.error
            ),
        ));
    }
    for r in &st.redriving {
        events.push((
            r.redriven_at,
            format!("redriven     to {:?}, waiting for its consumer", r.consumer),
        ));
    }
    events.sort_by_key(|(t, _)| *t);
    for (t, e) in events {
        println!("  {}  {e}", ts(t));
    }
    if st.producer.is_none() {
        println!("  (no producer outbox row in the databases given, or it was pruned)");
    }
}
