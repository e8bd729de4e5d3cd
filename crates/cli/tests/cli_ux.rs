//! What `custody` shows a user must not mislead: plain log lines when they
//! go to a file or a pipe, one line per configuration problem, usage lines
//! where optional flags look optional, a `--help` that names every command,
//! and dead-letter payloads that cannot garble a terminal.

mod common;

use common::Dir;
use std::process::Command;
use std::time::Duration;

use custody::sqlite::{SqliteEmbeddedSubscriber, SqliteInbox, SqliteOutbox};
use custody::{Consumer, ConsumerConfig, Handler, HandlerError, Message};

fn custody_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(i32, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_custody"))
        .args(args)
        .env_remove("CUSTODY_CONFIG")
        .env("CUSTODY_LOG", "error")
        .envs(env.iter().copied())
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn custody(args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    custody_env(args, &[])
}

/// A migrated, empty SQLite database in `dir`.
async fn empty_db(dir: &Dir) -> anyhow::Result<String> {
    let path = dir.file("db.db");
    let pool = custody::sqlite::connect(&path).await?;
    custody::sqlite::migrate(&pool).await?;
    pool.close().await;
    Ok(path)
}

#[tokio::test]
async fn log_lines_sent_to_a_pipe_carry_no_colour_codes() -> anyhow::Result<()> {
    let dir = Dir::new("ux-ansi")?;
    let db = empty_db(&dir).await?;
    // stderr is a pipe here (Command::output), as when redirected to a file
    let (code, out, err) = custody_env(&["dlq", "list", "--db", &db], &[("CUSTODY_LOG", "trace")])?;
    assert_eq!(code, 0, "{out}{err}");
    let log_lines = err
        .lines()
        .filter(|l| ["TRACE", "DEBUG", "INFO"].iter().any(|lvl| l.contains(lvl)))
        .count();
    assert!(log_lines > 0, "CUSTODY_LOG=trace logged nothing: {err}");
    assert!(
        !err.contains("\x1b["),
        "colour codes in a redirected log: {err:?}"
    );
    Ok(())
}

#[test]
fn help_documents_custody_log() -> anyhow::Result<()> {
    let (code, out, err) = custody(&["--help"])?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("CUSTODY_LOG sets what is logged: an env-filter"),
        "{out}"
    );
    Ok(())
}

/// The file holds three problems and the environment a fourth; each is
/// reported on a line of its own naming the key, where its value came
/// from and the form it must take.
#[test]
fn config_problems_are_one_line_each_with_key_origin_and_form() -> anyhow::Result<()> {
    let dir = Dir::new("ux-config")?;
    let cfg = dir.file("custody.toml");
    std::fs::write(
        &cfg,
        "[relay]\nbatch-sise = 10\npoll-interval = 50\n\n[consumer]\nfetch-wait = \"5 parsecs\"\n",
    )?;
    let db = dir.file("never.db");
    let args = [
        "relay",
        "--config",
        &cfg,
        "--db",
        &db,
        "--nats",
        "nats://127.0.0.1:1",
    ];
    let (code, out, err) = custody_env(&args, &[("CUSTODY_RELAY__MAX_ATTEMPTS", "lots")])?;
    assert_ne!(code, 0, "{out}{err}");
    let lines: Vec<&str> = err.lines().collect();
    let file = format!("config file {cfg}");
    assert_eq!(
        lines[0],
        "error: invalid configuration (4 problems; docs/CONFIG.md lists every key and its allowed form):",
        "{err}"
    );
    assert_eq!(
        lines[1],
        format!("  - {file}: consumer.fetch-wait = \"5 parsecs\": duration \"5 parsecs\" has unknown unit \" parsecs\"; use ms, s, m or h; write a duration in quotes: a whole number with ms, s, m or h, e.g. consumer.fetch-wait = \"500ms\""),
        "{err}"
    );
    assert!(
        lines[2].starts_with(&format!(
            "  - {file}: relay.batch-sise is not a known key; the keys of [relay] are backoff, batch-size, "
        )),
        "{err}"
    );
    assert_eq!(
        lines[3],
        "  - environment variable CUSTODY_RELAY__MAX_ATTEMPTS: relay.max-attempts = \"lots\" is a string; write a whole number, e.g. relay.max-attempts = 10",
        "{err}"
    );
    assert_eq!(
        lines[4],
        format!("  - {file}: relay.poll-interval = 50 is a whole number; write a duration in quotes: a whole number with ms, s, m or h, e.g. relay.poll-interval = \"500ms\""),
        "{err}"
    );
    assert_eq!(lines.len(), 5, "{err}");
    assert!(
        !std::path::Path::new(&db).exists(),
        "the relay started before its config was checked"
    );

    // out-of-range values: one line each, with where they came from
    std::fs::write(&cfg, "[relay]\nbatch-size = 0\n")?;
    let (code, out, err) = custody_env(&args, &[("CUSTODY_CONSUMER__BATCH_SIZE", "0")])?;
    assert_ne!(code, 0, "{out}{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(
        lines[0].starts_with("error: invalid configuration (2 problems;"),
        "{err}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "  - {file}: relay.batch-size = 0: must be between 1 and 100000"
        )),
        "{err}"
    );
    assert!(
        lines[2].starts_with(
            "  - environment variable CUSTODY_CONSUMER__BATCH_SIZE: consumer.batch-size = 0: must be between 1 and 100000"
        ),
        "{err}"
    );

    // a file that is not TOML: one line with the place
    std::fs::write(&cfg, "[relay\nbatch-size = 1\n")?;
    let (code, out, err) = custody(&args)?;
    assert_ne!(code, 0, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "error: config file {cfg} is not valid TOML at line 1, column "
        )),
        "{err}"
    );
    Ok(())
}

/// The first line of `custody <args> --help` that starts with `Usage:`.
fn usage(args: &[&str]) -> anyhow::Result<String> {
    let mut all = args.to_vec();
    all.push("--help");
    let (code, out, err) = custody(&all)?;
    assert_eq!(code, 0, "{out}{err}");
    Ok(out
        .lines()
        .find(|l| l.starts_with("Usage:"))
        .unwrap_or_default()
        .to_owned())
}

#[test]
fn usage_lines_show_only_required_flags_as_required() -> anyhow::Result<()> {
    assert_eq!(
        usage(&["reconcile"])?,
        "Usage: custody reconcile [OPTIONS] --consumer <URL> --consumer-name <NAME>"
    );
    assert_eq!(
        usage(&["dlq", "show"])?,
        "Usage: custody dlq show [OPTIONS] --db <URL> <ID>"
    );
    assert_eq!(
        usage(&["dlq", "list"])?,
        "Usage: custody dlq list [OPTIONS] --db <URL>"
    );
    assert_eq!(
        usage(&["dlq", "redrive"])?,
        "Usage: custody dlq redrive [OPTIONS] --db <URL> [ID]..."
    );
    assert_eq!(
        usage(&["trace"])?,
        "Usage: custody trace [OPTIONS] --db <URL> <ID>"
    );
    assert_eq!(
        usage(&["relay"])?,
        "Usage: custody relay [OPTIONS] --db <URL>"
    );
    // what each flag takes is named
    let (_, help, _) = custody(&["reconcile", "--help"])?;
    for flag in [
        "--settle <DURATION>",
        "--topic <TOPIC>",
        "--producer <URL>",
        "--from <TIME>",
        "--watch <DURATION>",
    ] {
        assert!(help.contains(flag), "{flag} missing in:\n{help}");
    }
    // a missing required flag still fails, naming it
    let (code, _, err) = custody(&["reconcile", "--consumer", "x.db", "--consumer-name", "b"])?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--producer <URL>") && err.contains("--topic <TOPIC>"),
        "{err}"
    );
    Ok(())
}

#[test]
fn help_names_every_command_with_its_purpose() -> anyhow::Result<()> {
    let (code, out, err) = custody(&["--help"])?;
    assert_eq!(code, 0, "{out}{err}");
    let commands: Vec<(&str, &str)> = out
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| {
            let l = l.trim_start();
            l.split_once(' ')
                .map(|(name, purpose)| (name, purpose.trim()))
        })
        .collect();
    for want in [
        "demo",
        "migrate",
        "relay",
        "dlq",
        "reconcile",
        "trace",
        "bench",
        "chaos",
        "help",
    ] {
        assert!(
            commands.iter().any(|(name, _)| *name == want),
            "{want} not listed:\n{out}"
        );
    }
    for (name, purpose) in &commands {
        assert!(purpose.len() > 10, "{name} has no purpose line:\n{out}");
        // every command listed exists
        // demo, bench and chaos forward to separate binaries, which a test
        // build does not always build (tools_cli.rs tests the forwarding)
        if !["help", "demo", "bench", "chaos"].contains(name) {
            let (code, o, e) = custody(&[name, "--help"])?;
            assert_eq!(code, 0, "custody {name} --help: {o}{e}");
        }
    }
    // the about text names only commands that exist (it once promised a
    // `consume` that was not there)
    let about = out.lines().next().unwrap_or_default();
    for word in about.split(|c: char| !c.is_alphanumeric()) {
        let command_like = [
            "demo",
            "relay",
            "consume",
            "produce",
            "migrate",
            "dlq",
            "reconcile",
            "trace",
            "replay",
            "bench",
            "chaos",
            "serve",
        ];
        if command_like.contains(&word) {
            assert!(
                commands.iter().any(|(name, _)| *name == word),
                "the about text names `{word}`, which is not a command: {about}"
            );
        }
    }
    assert!(!out.contains("worker"), "{out}");
    Ok(())
}

/// A handler that rejects every message for good: each one is dead-lettered.
struct Reject;

impl<Tx: Send + 'static> Handler<Tx> for Reject {
    async fn handle(&self, _tx: &mut Tx, _msg: &Message) -> Result<(), HandlerError> {
        Err(HandlerError::permanent("billing cannot read this payload"))
    }
}

#[tokio::test]
async fn dlq_show_escapes_binary_payloads_and_raw_writes_the_exact_bytes() -> anyhow::Result<()> {
    let dir = Dir::new("ux-dlq-binary")?;
    let (a_path, b_path) = (dir.file("a.db"), dir.file("b.db"));
    let a = custody::sqlite::connect(&a_path).await?;
    let b = custody::sqlite::connect(&b_path).await?;
    custody::sqlite::migrate(&a).await?;
    custody::sqlite::migrate(&b).await?;
    // NUL, 0xff, an escape sequence that would recolour a terminal, a bell
    let payload: Vec<u8> = b"\x00\xffhello\x1b[31mred\x07"
        .iter()
        .copied()
        .chain((0u8..=255).cycle().take(400))
        .collect();
    let msg = Message::builder("blobs", "k", "Blob")
        .payload("application/octet-stream", payload.clone())
        .build()?;
    let text = Message::builder("blobs", "k", "Note")
        .payload("text/plain", "plain text\nsecond line".as_bytes().to_vec())
        .build()?;
    let mut tx = a.begin().await?;
    SqliteOutbox::new(a.clone())
        .enqueue_batch(&mut tx, &[msg.clone(), text.clone()])
        .await?;
    tx.commit().await?;
    let sub = SqliteEmbeddedSubscriber::new(a.clone(), "billing", &["blobs".to_owned()]).await?;
    let mut cfg = ConsumerConfig::new("billing");
    cfg.fetch_wait = Duration::from_millis(20);
    let mut c = Consumer::new(SqliteInbox::new(b.clone()), sub, Reject, cfg);
    while c.run_once().await? > 0 {}
    a.close().await;
    b.close().await;

    let id = msg.id.to_string();
    let (code, out, err) = custody(&["dlq", "show", &id, "--db", &b_path])?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !out.contains('\0') && !out.contains('\x1b') && !out.contains('\x07'),
        "raw control bytes reached the terminal: {out:?}"
    );
    assert!(
        out.contains(&format!(
            "  payload:  {} bytes, application/octet-stream, not printable text; escaped preview of the first 256:\nb\"\\x00\\xffhello\\x1b[31mred\\x07\\x00\\x01",
            payload.len()
        )),
        "{out}"
    );
    assert!(out.contains("billing cannot read this payload"), "{out}");

    // --raw: exactly the bytes, nothing else
    let raw = Command::new(env!("CARGO_BIN_EXE_custody"))
        .args(["dlq", "show", &id, "--db", &b_path, "--raw"])
        .env("CUSTODY_LOG", "error")
        .output()?;
    assert!(raw.status.success(), "{raw:?}");
    assert_eq!(raw.stdout, payload, "--raw must write the exact payload");

    // text is shown as it is
    let (code, out, err) = custody(&["dlq", "show", &text.id.to_string(), "--db", &b_path])?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("  payload:  22 bytes, text/plain\nplain text\nsecond line"),
        "{out}"
    );

    // --json keeps binary out of the text field
    let (code, out, err) = custody(&["dlq", "show", &id, "--db", &b_path, "--json"])?;
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["payload"], serde_json::Value::Null, "{out}");
    assert_eq!(v["payload_len"], payload.len(), "{out}");
    assert!(
        v["payload_hex"]
            .as_str()
            .is_some_and(|h| h.starts_with("00ff68656c6c6f1b5b33316d")),
        "{out}"
    );
    Ok(())
}
