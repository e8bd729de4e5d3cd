//! `custody dlq list|show|redrive|purge`: dead letters of one database.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use custody::{Admin, DeadLetter, Message};
use uuid::Uuid;

use crate::ops::{consumers_hint, open_existing, redact, topics_hint};
use crate::reconcile::parse_time;

/// `custody dlq`.
#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

/// Which dead letters a command applies to.
#[derive(Debug, Args, Clone, Default)]
pub struct Filter {
    /// Only this topic.
    #[arg(long, value_name = "TOPIC")]
    pub topic: Option<String>,
    /// Only dead letters of this consumer (`consumer:<name>`); `relay` for the relay's.
    #[arg(long, value_name = "NAME")]
    pub consumer: Option<String>,
    /// Only those whose error contains this text (case-insensitive).
    #[arg(long, value_name = "TEXT")]
    pub error: Option<String>,
    /// Only those dead-lettered at or after this time (RFC 3339, or a duration ago: `2h`).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only those dead-lettered before this time (same forms).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
}

/// Dead-letter subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters with their reasons.
    List {
        /// Database URL (`postgres://…` or a SQLite file).
        #[arg(long, env = "CUSTODY_DB", hide_env_values = true, value_name = "URL")]
        db: String,
        #[command(flatten)]
        filter: Filter,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter in full: error, envelope, payload (text as is, binary as an escaped preview).
    Show {
        /// Message id, or `#<seq>` for one without an id.
        #[arg(value_name = "ID")]
        id: String,
        /// Database URL.
        #[arg(long, env = "CUSTODY_DB", hide_env_values = true, value_name = "URL")]
        db: String,
        /// Print JSON.
        #[arg(long, conflicts_with = "raw")]
        json: bool,
        /// Write the payload's exact bytes to stdout and nothing else (e.g. `> payload.bin`).
        #[arg(long)]
        raw: bool,
    },
    /// Send dead letters back: a consumer's go back to that consumer (processed once through
    /// its inbox), the relay's go back to pending in the outbox.
    Redrive(BulkArgs),
    /// Delete dead letters (a consumer's inbox row stays: a late redelivery is still skipped).
    Purge(BulkArgs),
}

/// Selection for `redrive` and `purge`.
#[derive(Debug, Args)]
pub struct BulkArgs {
    /// Message ids (or `#<seq>`); or use `--all` or filters.
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,
    /// Database URL.
    #[arg(long, env = "CUSTODY_DB", hide_env_values = true, value_name = "URL")]
    pub db: String,
    /// Every dead letter that matches the filters (all of them without filters).
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub filter: Filter,
    /// Show what would be done; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation when more than one dead letter is selected.
    #[arg(long)]
    pub yes: bool,
}

struct Resolved {
    from: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.topic.is_none()
            && self.consumer.is_none()
            && self.error.is_none()
            && self.since.is_none()
            && self.until.is_none()
    }

    fn resolve(&self) -> anyhow::Result<Resolved> {
        let now = Utc::now();
        Ok(Resolved {
            from: self
                .since
                .as_deref()
                .map(|s| parse_time(s, now))
                .transpose()?,
            until: self
                .until
                .as_deref()
                .map(|s| parse_time(s, now))
                .transpose()?,
        })
    }

    fn matches(&self, r: &Resolved, d: &DeadLetter) -> bool {
        let origin_ok = match self.consumer.as_deref() {
            None => true,
            Some("relay") => d.origin == "relay",
            Some(c) => d.origin == format!("consumer:{c}"),
        };
        origin_ok
            && self.topic.as_ref().is_none_or(|t| &d.topic == t)
            && self
                .error
                .as_ref()
                .is_none_or(|e| d.error.to_lowercase().contains(&e.to_lowercase()))
            && r.from.is_none_or(|f| d.dead_at >= f)
            && r.until.is_none_or(|u| d.dead_at < u)
    }
}

/// Open `url` as it is (never created or migrated) and check that the
/// filter's names are ones it has seen: a mistyped `--topic` or
/// `--consumer` would otherwise list nothing and look like "no dead letters".
async fn open(url: &str, filter: &Filter) -> anyhow::Result<Box<dyn Admin>> {
    let db = open_existing("database", url).await?;
    if let Some(topic) = &filter.topic {
        if !db.topic_seen(topic).await? {
            anyhow::bail!(
                "topic {topic:?} was never seen in {}{}; check --topic",
                redact(url),
                topics_hint(db.as_ref()).await
            );
        }
    }
    if let Some(name) = filter.consumer.as_deref().filter(|c| *c != "relay") {
        if !db.consumer_seen(name).await? {
            anyhow::bail!(
                "consumer {name:?} has never recorded a message in {}{}; check --consumer (a consumer's name, or `relay` for the relay's dead letters)",
                redact(url),
                consumers_hint(db.as_ref()).await
            );
        }
    }
    Ok(db)
}

/// Select by ids (`uuid` or `#seq`), else by filters; `None` = selector error.
fn select<'a>(
    all: &'a [(i64, DeadLetter)],
    ids: &[String],
    filter: &Filter,
) -> anyhow::Result<Vec<&'a (i64, DeadLetter)>> {
    let r = filter.resolve()?;
    if ids.is_empty() {
        return Ok(all.iter().filter(|(_, d)| filter.matches(&r, d)).collect());
    }
    let mut out = Vec::new();
    for want in ids {
        let found: Vec<&(i64, DeadLetter)> = if let Some(seq) = want.strip_prefix('#') {
            let seq: i64 = seq.parse().map_err(|_| {
                anyhow::anyhow!(
                    "{want:?}: after '#' comes a dead letter's sequence number, e.g. #12"
                )
            })?;
            all.iter().filter(|(s, _)| *s == seq).collect()
        } else {
            let id = Uuid::parse_str(want).map_err(|e| {
                anyhow::anyhow!("{want:?} is not a message id ({e}); give a UUID, or #<seq> as `custody dlq list` shows")
            })?;
            all.iter()
                .filter(|(_, d)| d.message_id == Some(id))
                .collect()
        };
        if found.is_empty() {
            anyhow::bail!(
                "no dead letter {want} in this database; `custody dlq list --db …` shows what is there"
            );
        }
        out.extend(found.into_iter().filter(|(_, d)| filter.matches(&r, d)));
    }
    Ok(out)
}

fn line(seq: i64, d: &DeadLetter) -> String {
    format!(
        "#{seq:<5} {}  {:<18} {:<12} {:<16} {}",
        d.message_id
            .map(|i| i.to_string())
            .unwrap_or_else(|| "(no id)".into()),
        d.origin,
        d.topic,
        d.message_type.as_deref().unwrap_or("?"),
        d.error
    )
}

fn json(seq: i64, d: &DeadLetter) -> serde_json::Value {
    serde_json::json!({
        "seq": seq,
        "message_id": d.message_id.map(|i| i.to_string()),
        "origin": d.origin, "topic": d.topic, "key": d.key, "type": d.message_type,
        "error": d.error, "attempts": d.attempts, "dead_at": d.dead_at.to_rfc3339(),
    })
}

/// `custody dlq …`.
pub async fn run(args: DlqArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        DlqCommand::List {
            db,
            filter,
            json: as_json,
        } => {
            let all = open(&db, &filter).await?.dead_letters().await?;
            let sel = select(&all, &[], &filter)?;
            for (seq, d) in &sel {
                if as_json {
                    println!("{}", json(*seq, d));
                } else {
                    println!("{}", line(*seq, d));
                }
            }
            if !as_json {
                println!("{} dead letter(s)", sel.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show {
            id,
            db,
            json: as_json,
            raw,
        } => {
            let all = open(&db, &Filter::default()).await?.dead_letters().await?;
            let sel = select(&all, std::slice::from_ref(&id), &Filter::default())?;
            if raw {
                let [(_, d)] = sel.as_slice() else {
                    let seqs: Vec<String> = sel.iter().map(|(s, _)| format!("#{s}")).collect();
                    anyhow::bail!(
                        "{} dead letters have id {id}; --raw writes one payload: name it by its sequence number ({})",
                        sel.len(),
                        seqs.join(", ")
                    );
                };
                let (_, payload) = payload_of(d);
                let mut out = std::io::stdout().lock();
                out.write_all(&payload)?;
                out.flush()?;
                return Ok(ExitCode::SUCCESS);
            }
            for (seq, d) in sel {
                let (message, payload) = payload_of(d);
                let content_type = message
                    .as_ref()
                    .map(|m| m.content_type.clone())
                    .filter(|c| !c.is_empty());
                if as_json {
                    let mut v = json(*seq, d);
                    v["envelope"] = message
                        .as_ref()
                        .and_then(|m| serde_json::to_value(m).ok())
                        .unwrap_or(serde_json::Value::Null);
                    v["content_type"] = content_type.clone().into();
                    v["payload_len"] = payload.len().into();
                    // text when it is UTF-8; otherwise null, and the bytes in hex
                    match std::str::from_utf8(&payload) {
                        Ok(text) => v["payload"] = text.into(),
                        Err(_) => {
                            v["payload"] = serde_json::Value::Null;
                            v["payload_hex"] = hex(&payload).into();
                        }
                    }
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    println!("{}", line(*seq, d));
                    println!("  key:      {}", d.key.as_deref().unwrap_or("?"));
                    println!("  attempts: {}", d.attempts);
                    println!("  dead at:  {}", d.dead_at.to_rfc3339());
                    println!("  error:    {}", d.error);
                    match &message {
                        Some(m) => {
                            // the payload is shown below, readable or escaped
                            let mut v = serde_json::to_value(m)?;
                            if let Some(o) = v.as_object_mut() {
                                o.remove("payload");
                            }
                            println!(
                                "  envelope: {}",
                                serde_json::to_string_pretty(&v)?.replace('\n', "\n  ")
                            );
                        }
                        None => println!("  envelope: (none: the message was malformed)"),
                    }
                    println!(
                        "  payload:  {}",
                        payload_preview(&payload, content_type.as_deref())
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Redrive(b) => bulk(b, true).await,
        DlqCommand::Purge(b) => bulk(b, false).await,
    }
}

/// The dead letter's envelope (when readable) and its payload: the
/// message's payload, or the raw bytes of a message too broken to read.
fn payload_of(d: &DeadLetter) -> (Option<Message>, Vec<u8>) {
    let message = d
        .envelope
        .as_deref()
        .and_then(|e| serde_json::from_str::<Message>(e).ok());
    let payload = match &message {
        Some(m) => m.payload.clone(),
        None => d.payload.clone(),
    };
    (message, payload)
}

/// Bytes shown in the escaped preview of a binary payload.
const PREVIEW_BYTES: usize = 256;

/// The payload for a terminal: printable UTF-8 text as it is, anything else
/// (NUL, control characters, invalid UTF-8) as an escaped preview of its
/// first bytes, which cannot disturb the terminal; both with the length and
/// the content type.
pub fn payload_preview(payload: &[u8], content_type: Option<&str>) -> String {
    let ct = content_type.unwrap_or("unknown content type");
    let n = payload.len();
    match std::str::from_utf8(payload) {
        Ok(text)
            if !text
                .chars()
                .any(|c| c.is_control() && !matches!(c, '\n' | '\t')) =>
        {
            format!("{n} bytes, {ct}\n{text}")
        }
        _ => {
            let shown = &payload[..n.min(PREVIEW_BYTES)];
            let escaped: String = shown.escape_ascii().to_string();
            let more = if n > PREVIEW_BYTES { "…" } else { "" };
            format!(
                "{n} bytes, {ct}, not printable text; escaped preview{}:\nb\"{escaped}\"{more}\n(`custody dlq show --raw` writes the exact bytes to stdout, e.g. `> payload.bin`)",
                if n > PREVIEW_BYTES {
                    format!(" of the first {PREVIEW_BYTES}")
                } else {
                    String::new()
                }
            )
        }
    }
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

async fn bulk(b: BulkArgs, redrive: bool) -> anyhow::Result<ExitCode> {
    let verb = if redrive { "redrive" } else { "purge" };
    if b.ids.is_empty() && !b.all && b.filter.is_empty() {
        anyhow::bail!(
            "say which dead letters to {verb}: message ids, filters (--topic, --consumer, --error, --since, --until), or --all"
        );
    }
    let db = open(&b.db, &b.filter).await?;
    let all = db.dead_letters().await?;
    let sel = select(&all, &b.ids, &b.filter)?;
    if sel.is_empty() {
        println!("no dead letter matches; nothing to {verb}");
        return Ok(ExitCode::SUCCESS);
    }
    for (seq, d) in &sel {
        println!("{}", line(*seq, d));
    }
    if b.dry_run {
        println!(
            "dry run: would {verb} {} dead letter(s) in {}",
            sel.len(),
            redact(&b.db)
        );
        return Ok(ExitCode::SUCCESS);
    }
    if sel.len() > 1 && !b.yes {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            anyhow::bail!(
                "refusing to {verb} {} dead letters without confirmation; pass --yes (or --dry-run to only list them)",
                sel.len()
            );
        }
        print!("{verb} these {} dead letters? [y/N] ", sel.len());
        std::io::stdout().flush()?;
        let mut answer = String::new();
        stdin.lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("nothing done");
            return Ok(ExitCode::SUCCESS);
        }
    }
    let seqs: Vec<i64> = sel.iter().map(|(s, _)| *s).collect();
    if !redrive {
        let n = db.purge(&seqs).await?;
        println!("purged {n} dead letter(s)");
        return Ok(ExitCode::SUCCESS);
    }
    let custody::RedriveOutcome {
        to_consumer,
        to_relay,
        skipped,
    } = db.redrive(&seqs, Utc::now()).await?;
    println!(
        "redriven: {to_consumer} back to their consumer (processed at its next redrive check, once), {to_relay} back to pending for the relay"
    );
    for (seq, why) in &skipped {
        println!("skipped #{seq}: {why}");
    }
    Ok(if skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::payload_preview;

    #[test]
    fn text_is_shown_as_is_and_binary_escaped() {
        assert_eq!(
            payload_preview(b"{\"a\": 1}\n", Some("application/json")),
            "9 bytes, application/json\n{\"a\": 1}\n"
        );
        let p = payload_preview(b"ab\x00\xff\x1b[31m", Some("application/octet-stream"));
        assert!(
            p.starts_with("9 bytes, application/octet-stream, not printable text; escaped preview:\nb\"ab\\x00\\xff\\x1b[31m\""),
            "{p}"
        );
        assert!(!p.contains('\x1b') && !p.contains('\0'), "{p}");
        let long = vec![0u8; 1000];
        let p = payload_preview(&long, None);
        assert!(p.starts_with("1000 bytes, unknown content type, not printable text; escaped preview of the first 256:"), "{p}");
        assert!(p.contains("\"…"), "{p}");
    }
}
