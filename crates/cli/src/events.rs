//! `custody events append|read|tail|streams`: the event store from the
//! command line (docs/OPERATIONS.md, "custody events"). Every command opens
//! the store through the registry (`custody::open_events`), whichever
//! backend the URL names; output is JSON lines on stdout, messages on
//! stderr.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Args, Subcommand};
use custody::event::{
    validate_stream_name, AppendOutcome, Direction, DynEventStore, EventData, ExpectedVersion,
    LogFilter, RecordedEvent, StreamInfo,
};
use custody::{Access, CONTENT_TYPE_JSON};
use uuid::Uuid;

use crate::ops::{config_text, redact};

/// Exit status of an append the store refused (wrong expected version, a
/// tombstoned stream): distinct from 1 (an error) and 2 (a usage error), so
/// a script can tell "decide again" from "something is broken".
pub const EXIT_REFUSED: u8 = 3;

/// Events read per call to the store; the commands page through longer
/// reads.
const PAGE: usize = 1000;

/// How long `tail --follow` waits for the head to move before asking again
/// (appends wake it earlier).
const FOLLOW_WAIT: Duration = Duration::from_secs(1);

/// `custody events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(subcommand)]
    pub command: EventsCommand,
}

/// The `custody events` commands.
#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Append events to a stream, checked against an expected version (one atomic append).
    Append(AppendArgs),
    /// Read a stream's events (forwards from a version, or backwards).
    Read(ReadArgs),
    /// Read the global log in position order, optionally following new events until SIGINT/SIGTERM.
    Tail(TailArgs),
    /// List streams (name, version, state) in name order.
    Streams(StreamsArgs),
}

/// The database option every `custody events` command takes.
#[derive(Debug, Args)]
pub struct DbArg {
    /// The custody database holding the event store: `postgres://…` or a SQLite file
    /// (`sqlite://path` or a path).
    #[arg(long, env = "CUSTODY_DB", hide_env_values = true, value_name = "URL")]
    pub db: String,
}

/// `custody events append`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("payload").args(["data", "file"])))]
pub struct AppendArgs {
    #[command(flatten)]
    pub db: DbArg,
    /// The stream, e.g. `order-42` (its category is the part before the first `-`).
    #[arg(value_name = "STREAM")]
    pub stream: String,
    /// The version the stream must be at: `any`, `no-stream`, `exists`, or a number
    /// (0 = no stream). Otherwise nothing is appended and the exit status is 3.
    #[arg(long, default_value = "any", value_parser = parse_expected, value_name = "any|no-stream|exists|N")]
    pub expected: ExpectedVersion,
    /// The event type (required with --data and --file; with standard input, each line is
    /// then one event's payload).
    #[arg(long = "type", value_name = "TYPE")]
    pub event_type: Option<String>,
    /// One event whose payload is this JSON text.
    #[arg(long, value_name = "JSON")]
    pub data: Option<String>,
    /// One event whose payload is the bytes of this file.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Content type of a --data or --file payload. Default: application/json for --data and a
    /// file that parses as JSON, else application/octet-stream.
    #[arg(long, requires = "payload")]
    pub content_type: Option<String>,
    /// The event id (a UUID) of a --data or --file event, instead of a fresh UUIDv7: appending
    /// the same id at the same version again is idempotent (nothing written twice).
    #[arg(long, requires = "payload", value_name = "UUID")]
    pub id: Option<Uuid>,
    /// Schema version of the payload (applies to every event of this append unless a line
    /// says otherwise).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub schema_version: u32,
    /// A tag (e.g. `customer:7`) on every event of this append; repeatable.
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Metadata header `name=value` (1 to 20 of a-z0-9, e.g. correlationid=req-1) on every
    /// event of this append; repeatable.
    #[arg(long = "header", value_parser = parse_header, value_name = "NAME=VALUE")]
    pub headers: Vec<(String, String)>,
}

/// `custody events read`.
#[derive(Debug, Args)]
pub struct ReadArgs {
    #[command(flatten)]
    pub db: DbArg,
    /// The stream.
    #[arg(value_name = "STREAM")]
    pub stream: String,
    /// First version to read (inclusive). Default: 1, or the last event with --backward.
    #[arg(long, value_name = "N")]
    pub from: Option<u64>,
    /// Newest first.
    #[arg(long)]
    pub backward: bool,
    /// Read at most this many events (default: all).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

/// `custody events tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub db: DbArg,
    /// Start after this position of the global log (0 = from the first event).
    #[arg(long, default_value_t = 0, value_name = "POS")]
    pub from: u64,
    /// Only streams of this category (`order` for `order-*`); repeatable (any of them).
    #[arg(long = "category", value_name = "C")]
    pub categories: Vec<String>,
    /// Only events of this type; repeatable (any of them).
    #[arg(long = "type", value_name = "T")]
    pub types: Vec<String>,
    /// Keep printing new events as they are appended, until SIGINT/SIGTERM.
    #[arg(long)]
    pub follow: bool,
}

/// `custody events streams`.
#[derive(Debug, Args)]
pub struct StreamsArgs {
    #[command(flatten)]
    pub db: DbArg,
    /// Only streams whose name starts with this.
    #[arg(long, default_value = "", value_name = "P")]
    pub prefix: String,
    /// List at most this many (default: all).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

fn parse_expected(s: &str) -> Result<ExpectedVersion, String> {
    match s {
        "any" => Ok(ExpectedVersion::Any),
        "no-stream" => Ok(ExpectedVersion::NoStream),
        "exists" => Ok(ExpectedVersion::StreamExists),
        n => n.parse::<u64>().map(ExpectedVersion::Exact).map_err(|_| {
            format!("{s:?} is not an expected version; use any, no-stream, exists or a number (the stream's version, 0 = no stream)")
        }),
    }
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) => Ok((name.to_owned(), value.to_owned())),
        None => Err(format!("{s:?} is not name=value")),
    }
}

/// `custody events …`.
pub async fn run(args: EventsArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        EventsCommand::Append(a) => append(a).await,
        EventsCommand::Read(a) => read(a).await,
        EventsCommand::Tail(a) => tail(a).await,
        EventsCommand::Streams(a) => streams(a).await,
    }
}

/// Open the store at `db`: `Access::Existing` for the commands that only
/// read (never created or migrated, invariant 8), `Access::Migrate` for
/// append (as `custody produce` opens the outbox).
async fn open(db: &str, access: Access) -> anyhow::Result<Box<dyn DynEventStore>> {
    custody::open_events(db, access)
        .await
        .map_err(|e| anyhow::anyhow!("database {}: {}", redact(db), config_text(&e)))
}

/// A stream name from the command line, checked before anything is opened
/// (a bad name must not create a database).
fn stream_name(stream: &str) -> anyhow::Result<()> {
    validate_stream_name(stream).map_err(|e| anyhow::anyhow!("{}", config_text(&e)))
}

// ---------------------------------------------------------------------------
// append

async fn append(args: AppendArgs) -> anyhow::Result<ExitCode> {
    stream_name(&args.stream)?;
    // every event is built and checked before the database is opened: bad
    // input neither creates a database nor appends a part of the batch
    let events = events_to_append(&args)?;
    for e in &events {
        e.validate()
            .map_err(|err| anyhow::anyhow!("{}", config_text(&err)))?;
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let store = open(&args.db.db, Access::Migrate).await?;
    let outcome = store
        .append(&args.stream, args.expected, events)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "append to stream {:?} in {}: {}",
                args.stream,
                redact(&args.db.db),
                config_text(&e)
            )
        })?;
    let mut out = Out::stdout();
    match outcome {
        AppendOutcome::Appended(a) => {
            out.line(&serde_json::json!({
                "stream": args.stream,
                "outcome": "appended",
                "first_version": a.first_version,
                "version": a.version,
                "idempotent": a.idempotent,
                "ids": ids,
            }))?;
            if a.idempotent {
                eprintln!(
                    "these events were already in stream {:?} at versions {}..={}: nothing was written again",
                    args.stream, a.first_version, a.version
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        AppendOutcome::WrongVersion { expected, actual } => {
            out.line(&serde_json::json!({
                "stream": args.stream,
                "outcome": "wrong_version",
                "expected": expected_json(expected),
                "actual": actual,
            }))?;
            let at = match actual {
                Some(v) => format!("is at version {v}"),
                None => "does not exist".to_owned(),
            };
            let retry = match actual {
                Some(v) => format!("--expected {v}"),
                None => "--expected no-stream".to_owned(),
            };
            eprintln!(
                "error: stream {:?} {at}, not {expected} as --expected said: nothing was appended. \
                 Read it again (custody events read), decide, and append with {retry}",
                args.stream
            );
            Ok(ExitCode::from(EXIT_REFUSED))
        }
        AppendOutcome::Tombstoned => {
            out.line(&serde_json::json!({
                "stream": args.stream,
                "outcome": "tombstoned",
            }))?;
            eprintln!(
                "error: stream {:?} was deleted with a tombstone and takes no more events: nothing was appended; use another stream name",
                args.stream
            );
            Ok(ExitCode::from(EXIT_REFUSED))
        }
        other => {
            out.line(&serde_json::json!({
                "stream": args.stream,
                "outcome": format!("{other:?}"),
            }))?;
            eprintln!(
                "error: the store refused the append to stream {:?} ({other:?}): nothing was appended",
                args.stream
            );
            Ok(ExitCode::from(EXIT_REFUSED))
        }
    }
}

/// `--expected` as the command line writes it, for the JSON outcome.
fn expected_json(e: ExpectedVersion) -> serde_json::Value {
    match e {
        ExpectedVersion::Any => "any".into(),
        ExpectedVersion::NoStream => "no-stream".into(),
        ExpectedVersion::StreamExists => "exists".into(),
        ExpectedVersion::Exact(n) => n.into(),
    }
}

/// The events the arguments describe: one from --data or --file, else one
/// per non-empty line of standard input.
fn events_to_append(args: &AppendArgs) -> anyhow::Result<Vec<EventData>> {
    if args.data.is_some() || args.file.is_some() {
        let Some(event_type) = &args.event_type else {
            anyhow::bail!(
                "--type is required with --data and --file: the event's type, e.g. --type OrderPlaced"
            );
        };
        let (content_type, payload) = if let Some(json) = &args.data {
            serde_json::from_str::<serde_json::Value>(json).map_err(|e| {
                anyhow::anyhow!(
                    "--data {json:?} is not valid JSON ({e}); give a JSON document (e.g. --data '{{\"total\": 990}}'), or the bytes of a file with --file"
                )
            })?;
            (
                args.content_type
                    .clone()
                    .unwrap_or_else(|| CONTENT_TYPE_JSON.to_owned()),
                json.clone().into_bytes(),
            )
        } else {
            let path = args.file.as_ref().context("--file")?;
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read --file {}", path.display()))?;
            let ct = args.content_type.clone().unwrap_or_else(|| {
                if serde_json::from_slice::<serde_json::Value>(&bytes).is_ok() {
                    CONTENT_TYPE_JSON.to_owned()
                } else {
                    "application/octet-stream".to_owned()
                }
            });
            (ct, bytes)
        };
        let mut event = common(
            args,
            EventData::new(event_type.clone(), content_type, payload),
        )?;
        if let Some(id) = args.id {
            event = event.id(id);
        }
        return Ok(vec![event]);
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!(
            "reading events from standard input, one JSON per line; end with Ctrl-D (or give --data / --file)"
        );
    }
    let mut events = Vec::new();
    for (i, line) in stdin.lock().lines().enumerate() {
        let n = i + 1;
        let line = line.with_context(|| format!("cannot read line {n} of standard input"))?;
        if line.trim().is_empty() {
            continue;
        }
        events
            .push(line_event(args, &line).with_context(|| format!("line {n} of standard input"))?);
    }
    if events.is_empty() {
        anyhow::bail!(
            "nothing to append: standard input had no event. Give --data JSON or --file F, or one JSON per line on standard input"
        );
    }
    Ok(events)
}

/// What a standard-input line may say about its event besides the payload
/// (without `--type`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LineEvent {
    #[serde(rename = "type")]
    event_type: String,
    data: serde_json::Value,
    id: Option<Uuid>,
    schema_version: Option<u32>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
}

/// One event from a standard-input line: with `--type`, the line is the
/// JSON payload; without, an object `{"type": …, "data": …}` (optional
/// `id`, `schema_version`, `tags`, `headers`).
fn line_event(args: &AppendArgs, line: &str) -> anyhow::Result<EventData> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
        anyhow::anyhow!(
            "not valid JSON ({e}); each line is one event: its JSON payload with --type, else {{\"type\": \"OrderPlaced\", \"data\": {{…}}}}"
        )
    })?;
    if let Some(event_type) = &args.event_type {
        return common(
            args,
            EventData::new(event_type.clone(), CONTENT_TYPE_JSON, line.as_bytes()),
        );
    }
    let e: LineEvent = serde_json::from_value(value).map_err(|e| {
        anyhow::anyhow!(
            "{e}; without --type each line is an object {{\"type\": \"OrderPlaced\", \"data\": {{…}}}} (optional: id, schema_version, tags, headers), or give --type and one JSON payload per line"
        )
    })?;
    let payload = serde_json::to_vec(&e.data)?;
    let mut event = common(
        args,
        EventData::new(e.event_type, CONTENT_TYPE_JSON, payload),
    )?;
    if let Some(id) = e.id {
        event = event.id(id);
    }
    if let Some(v) = e.schema_version {
        event = event.schema_version(v);
    }
    for tag in e.tags {
        event = event.tag(tag);
    }
    for (name, value) in e.headers {
        event = event.header(&name, value)?;
    }
    Ok(event)
}

/// `event` with the options that apply to every event of the append.
fn common(args: &AppendArgs, mut event: EventData) -> anyhow::Result<EventData> {
    event = event.schema_version(args.schema_version);
    for tag in &args.tags {
        event = event.tag(tag.clone());
    }
    for (name, value) in &args.headers {
        event = event
            .header(name, value.clone())
            .map_err(|e| anyhow::anyhow!("--header {name}={value}: {}", config_text(&e)))?;
    }
    Ok(event)
}

// ---------------------------------------------------------------------------
// read

async fn read(args: ReadArgs) -> anyhow::Result<ExitCode> {
    stream_name(&args.stream)?;
    if args.limit == Some(0) {
        anyhow::bail!("--limit 0 would read nothing; give at least 1, or leave it out to read all");
    }
    let store = open(&args.db.db, Access::Existing).await?;
    let (direction, mut from) = if args.backward {
        (Direction::Backward, args.from.unwrap_or(u64::MAX))
    } else {
        (Direction::Forward, args.from.unwrap_or(1))
    };
    let mut left = args.limit.unwrap_or(usize::MAX);
    let mut out = Out::stdout();
    let mut printed = 0u64;
    let mut first = true;
    while left > 0 {
        let want = left.min(PAGE);
        let slice = store
            .read_stream(&args.stream, direction, from, want)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "read stream {:?} of {}: {e}",
                    args.stream,
                    redact(&args.db.db)
                )
            })?;
        if first {
            first = false;
            if slice.version.is_none() {
                let hint = streams_hint(store.as_ref(), &args.stream).await;
                anyhow::bail!(
                    "stream {:?} does not exist in {}{hint}; `custody events streams` lists them",
                    args.stream,
                    redact(&args.db.db)
                );
            }
            if slice.tombstoned {
                eprintln!(
                    "stream {:?} was deleted with a tombstone (version {})",
                    args.stream,
                    slice.version.unwrap_or(0)
                );
            }
        }
        let got = slice.events.len();
        let Some(last) = slice.events.last().map(|e| e.version) else {
            break;
        };
        for e in &slice.events {
            if !out.line(&event_line(e))? {
                return Ok(ExitCode::SUCCESS);
            }
            printed += 1;
        }
        left = left.saturating_sub(got);
        if got < want {
            break;
        }
        from = match direction {
            Direction::Forward => last.saturating_add(1),
            Direction::Backward if last <= 1 => break,
            Direction::Backward => last - 1,
        };
    }
    if printed == 0 {
        eprintln!(
            "stream {:?} has no event to read from version {} {} (deleted, truncated or past its end)",
            args.stream,
            args.from.map_or_else(
                || if args.backward { "end".to_owned() } else { "1".to_owned() },
                |f| f.to_string()
            ),
            if args.backward { "backwards" } else { "on" },
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// ` (streams there: a, b)` or what to say when there are none, for an
/// error about a stream that does not exist.
async fn streams_hint(store: &dyn DynEventStore, wanted: &str) -> String {
    const SHOWN: usize = 20;
    // the streams of its category first: the likeliest typo
    let category = custody::event::category_of(wanted);
    let mut names = match store.streams(category, None, SHOWN).await {
        Ok(s) => s,
        Err(_) => return String::new(),
    };
    if names.is_empty() {
        names = match store.streams("", None, SHOWN).await {
            Ok(s) => s,
            Err(_) => return String::new(),
        };
    }
    if names.is_empty() {
        return " (no stream there yet)".to_owned();
    }
    let more = if names.len() >= SHOWN { ", …" } else { "" };
    let shown: Vec<String> = names.iter().map(|s| format!("{:?}", s.stream)).collect();
    format!(" (streams there: {}{more})", shown.join(", "))
}

// ---------------------------------------------------------------------------
// tail

async fn tail(args: TailArgs) -> anyhow::Result<ExitCode> {
    let store = open(&args.db.db, Access::Existing).await?;
    let filter = LogFilter {
        categories: args.categories.clone(),
        types: args.types.clone(),
    };
    // installed before the first read, so a signal during the catch-up
    // stops cleanly too
    let stop = args.follow.then(custody::shutdown_token);
    let mut after = args.from;
    let mut out = Out::stdout();
    let mut printed = 0u64;
    let mut following = false;
    loop {
        let read = store.read_all(after, &filter, PAGE);
        let slice = match &stop {
            Some(stop) => tokio::select! {
                _ = stop.cancelled() => break,
                r = read => r,
            },
            None => read.await,
        }
        .map_err(|e| {
            anyhow::anyhow!(
                "read the log of {} after position {after}: {e}",
                redact(&args.db.db)
            )
        })?;
        for e in &slice.events {
            if !out.line(&event_line(e))? {
                return Ok(ExitCode::SUCCESS);
            }
            printed += 1;
        }
        if slice.scanned_to <= after && after < slice.head {
            // a read below the head must cover something; looping here
            // would spin without printing
            anyhow::bail!(
                "the event store of {} read nothing after position {after} although its head is {}; report this as a bug",
                redact(&args.db.db),
                slice.head
            );
        }
        after = after.max(slice.scanned_to);
        if after < slice.head {
            continue; // more of the log to catch up on
        }
        let Some(stop) = &stop else {
            break;
        };
        if !following {
            following = true;
            eprintln!("caught up at position {after}; following new events until SIGINT/SIGTERM");
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            r = store.wait_for_head(after, FOLLOW_WAIT) => {
                r.map_err(|e| anyhow::anyhow!("wait for new events in {}: {e}", redact(&args.db.db)))?;
            }
        }
    }
    if args.follow {
        eprintln!(
            "tail stopped: {printed} events printed, at position {after} (resume with --from {after})"
        );
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------
// streams

async fn streams(args: StreamsArgs) -> anyhow::Result<ExitCode> {
    if args.limit == Some(0) {
        anyhow::bail!("--limit 0 would list nothing; give at least 1, or leave it out to list all");
    }
    let store = open(&args.db.db, Access::Existing).await?;
    let mut left = args.limit.unwrap_or(usize::MAX);
    let mut after: Option<String> = None;
    let mut out = Out::stdout();
    let mut listed = 0u64;
    while left > 0 {
        let want = left.min(PAGE);
        let page = store
            .streams(&args.prefix, after.as_deref(), want)
            .await
            .map_err(|e| anyhow::anyhow!("list streams of {}: {e}", redact(&args.db.db)))?;
        for s in &page {
            if !out.line(&stream_line(s))? {
                return Ok(ExitCode::SUCCESS);
            }
            listed += 1;
        }
        left = left.saturating_sub(page.len());
        if page.len() < want {
            break;
        }
        after = page.last().map(|s| s.stream.clone());
    }
    if listed == 0 {
        if args.prefix.is_empty() {
            eprintln!("no stream in {} yet", redact(&args.db.db));
        } else {
            eprintln!(
                "no stream name starts with {:?} in {}",
                args.prefix,
                redact(&args.db.db)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------
// output

/// One event as the JSON line `read` and `tail` print: the payload as JSON
/// when its content type is JSON, else as `custody consume --handler print`
/// shows it (UTF-8 text, or base64), with `payload_encoding` saying which.
pub fn event_line(e: &RecordedEvent) -> serde_json::Value {
    let (payload, encoding) = custody::declarative::payload_value(&e.content_type, &e.payload);
    serde_json::json!({
        "stream": e.stream,
        "version": e.version,
        "position": e.position,
        "id": e.id,
        "type": e.event_type,
        "schema_version": e.schema_version,
        "content_type": e.content_type,
        "headers": e.headers,
        "tags": e.tags,
        "recorded_at": e.recorded_at,
        "payload": payload,
        "payload_encoding": encoding,
    })
}

/// One stream as the JSON line `streams` prints.
fn stream_line(s: &StreamInfo) -> serde_json::Value {
    serde_json::json!({
        "stream": s.stream,
        "category": custody::event::category_of(&s.stream),
        "version": s.version,
        "tombstoned": s.tombstoned,
        "updated_at": s.updated_at,
        "metadata": s.metadata,
    })
}

/// Standard output for JSON lines. A closed pipe (`custody events tail |
/// head`) ends the command quietly rather than as an error.
struct Out {
    out: std::io::Stdout,
}

impl Out {
    fn stdout() -> Out {
        Out {
            out: std::io::stdout(),
        }
    }

    /// Write `v` as one line; `false` when the reader has gone.
    fn line(&mut self, v: &serde_json::Value) -> anyhow::Result<bool> {
        let mut lock = self.out.lock();
        match writeln!(lock, "{v}").and_then(|()| lock.flush()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(e).context("cannot write to standard output"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_versions_parse() {
        assert_eq!(parse_expected("any"), Ok(ExpectedVersion::Any));
        assert_eq!(parse_expected("no-stream"), Ok(ExpectedVersion::NoStream));
        assert_eq!(parse_expected("exists"), Ok(ExpectedVersion::StreamExists));
        assert_eq!(parse_expected("7"), Ok(ExpectedVersion::Exact(7)));
        let err = parse_expected("latest").unwrap_err();
        assert!(err.contains("any, no-stream, exists or a number"), "{err}");
        assert!(parse_expected("-1").is_err());
        for e in [
            ExpectedVersion::Any,
            ExpectedVersion::NoStream,
            ExpectedVersion::StreamExists,
            ExpectedVersion::Exact(3),
        ] {
            let shown = expected_json(e);
            let text = shown
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| shown.to_string());
            assert_eq!(parse_expected(&text), Ok(e), "{shown}");
        }
    }
}
