//! `custody produce`: enqueue test messages through a database's outbox
//! (docs/OPERATIONS.md, "custody consume and custody produce").

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{ArgGroup, Args};
use custody::{is_json_content_type, Message, CONTENT_TYPE_JSON};

use crate::ops::{config_text, redact};

/// `custody produce`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("payload").args(["json", "payload_file", "stdin"])))]
pub struct ProduceArgs {
    /// The producer's database holding the outbox: `postgres://…` or a SQLite
    /// file (`sqlite://path` or a path). Created (SQLite) and migrated if needed.
    #[arg(long, env = "CUSTODY_DB", hide_env_values = true, value_name = "URL")]
    pub db: String,
    /// The messages' topic.
    #[arg(long)]
    pub topic: String,
    /// The ordering key (messages of one key are delivered in order).
    #[arg(long, default_value = "test")]
    pub key: String,
    /// The message type.
    #[arg(long = "type", default_value = "TestMessage")]
    pub message_type: String,
    /// Payload: this JSON text (default `{}`).
    #[arg(long)]
    pub json: Option<String>,
    /// Payload: the bytes of this file.
    #[arg(long)]
    pub payload_file: Option<PathBuf>,
    /// Payloads from standard input, one message per line (empty lines skipped).
    #[arg(long)]
    pub stdin: bool,
    /// Content type. Default: application/json for --json, for a file or a line
    /// that parses as JSON, else application/octet-stream (file) or text/plain (line).
    #[arg(long)]
    pub content_type: Option<String>,
    /// Header `name=value` (CloudEvents extension name: 1 to 20 of a-z0-9); repeatable.
    #[arg(long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Send this many numbered copies: a JSON object payload gets `"n": 1…N`
    /// added; any other payload is sent as it is, N times (each its own id).
    #[arg(long, default_value_t = 1, conflicts_with = "stdin")]
    pub count: u64,
    /// Messages per transaction.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Print every id (default: every id up to 10 messages, else a count with
    /// the first and last id).
    #[arg(long)]
    pub print_ids: bool,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) => Ok((name.to_owned(), value.to_owned())),
        None => Err(format!("{s:?} is not name=value")),
    }
}

/// How many ids are printed one per line without `--print-ids`.
const IDS_SHOWN: usize = 10;

pub async fn run(args: ProduceArgs) -> anyhow::Result<ExitCode> {
    if args.count == 0 {
        anyhow::bail!("--count 0 would send nothing; give at least 1");
    }
    if args.batch == 0 {
        anyhow::bail!("--batch 0 would send nothing; give at least 1");
    }
    let outbox = custody::open_outbox(&args.db)
        .await
        .map_err(|e| anyhow::anyhow!("database {}: {}", redact(&args.db), config_text(&e)))?;
    let mut ids = Vec::new();
    let mut batch = Vec::with_capacity(args.batch.min(10_000));
    if args.stdin {
        let stdin = std::io::stdin();
        for (i, line) in stdin.lock().lines().enumerate() {
            let line = line.with_context(|| format!("cannot read line {} of stdin", i + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            let content_type = args.content_type.clone().unwrap_or_else(|| {
                if serde_json::from_str::<serde_json::Value>(&line).is_ok() {
                    CONTENT_TYPE_JSON.to_owned()
                } else {
                    "text/plain".to_owned()
                }
            });
            batch.push(
                message(&args, content_type, line.into_bytes())
                    .with_context(|| format!("line {} of stdin", i + 1))?,
            );
            if batch.len() >= args.batch {
                flush(&outbox, &args.db, &mut batch, &mut ids).await?;
            }
        }
    } else {
        let (content_type, payload) = payload(&args)?;
        let object = if is_json_content_type(&content_type) && args.count > 1 {
            serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&payload).ok()
        } else {
            None
        };
        for n in 1..=args.count {
            let bytes = match &object {
                Some(o) => {
                    let mut o = o.clone();
                    o.insert("n".to_owned(), n.into());
                    serde_json::to_vec(&o)?
                }
                None => payload.clone(),
            };
            batch.push(message(&args, content_type.clone(), bytes)?);
            if batch.len() >= args.batch {
                flush(&outbox, &args.db, &mut batch, &mut ids).await?;
            }
        }
    }
    if !batch.is_empty() {
        flush(&outbox, &args.db, &mut batch, &mut ids).await?;
    }
    if args.print_ids || ids.len() <= IDS_SHOWN {
        for id in &ids {
            println!("{id}");
        }
    } else if let (Some(first), Some(last)) = (ids.first(), ids.last()) {
        println!(
            "enqueued {} messages of topic {}: first {first}, last {last}",
            ids.len(),
            args.topic
        );
    }
    if ids.is_empty() {
        eprintln!("nothing enqueued: standard input had no non-empty line");
    }
    Ok(ExitCode::SUCCESS)
}

/// Enqueue `batch` in one transaction and note the ids.
async fn flush(
    outbox: &custody::AnyOutbox,
    db: &str,
    batch: &mut Vec<Message>,
    ids: &mut Vec<uuid::Uuid>,
) -> anyhow::Result<()> {
    let msgs = std::mem::take(batch);
    outbox.enqueue_batch(&msgs).await.map_err(|e| {
        anyhow::anyhow!(
            "enqueue into {}: {} ({} messages were enqueued before this batch)",
            redact(db),
            config_text(&e),
            ids.len()
        )
    })?;
    ids.extend(msgs.iter().map(|m| m.id));
    Ok(())
}

/// The payload of `--json` / `--payload-file` (default `{}`) and its content type.
fn payload(args: &ProduceArgs) -> anyhow::Result<(String, Vec<u8>)> {
    if let Some(json) = &args.json {
        serde_json::from_str::<serde_json::Value>(json)
            .with_context(|| format!("--json {json:?} is not valid JSON"))?;
        let ct = args
            .content_type
            .clone()
            .unwrap_or_else(|| CONTENT_TYPE_JSON.to_owned());
        return Ok((ct, json.clone().into_bytes()));
    }
    if let Some(path) = &args.payload_file {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read --payload-file {}", path.display()))?;
        let ct = args.content_type.clone().unwrap_or_else(|| {
            if serde_json::from_slice::<serde_json::Value>(&bytes).is_ok() {
                CONTENT_TYPE_JSON.to_owned()
            } else {
                "application/octet-stream".to_owned()
            }
        });
        return Ok((ct, bytes));
    }
    let ct = args
        .content_type
        .clone()
        .unwrap_or_else(|| CONTENT_TYPE_JSON.to_owned());
    Ok((ct, b"{}".to_vec()))
}

fn message(args: &ProduceArgs, content_type: String, payload: Vec<u8>) -> anyhow::Result<Message> {
    let mut b =
        Message::builder(&args.topic, &args.key, &args.message_type).payload(content_type, payload);
    for (name, value) in &args.headers {
        b = b.header(name, value.clone())?;
    }
    Ok(b.build()?)
}
