//! `custody-demo` as a user meets it: a `--help` without internal roles,
//! plain log lines when stderr is not a terminal, `--keep` leaving the run's
//! databases with the commands to inspect them, and a `--postgres` URL whose
//! database does not exist explained.

use std::process::Command;

fn demo(args: &[&str], log: &str) -> anyhow::Result<(i32, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_custody-demo"))
        .args(args)
        .env("CUSTODY_LOG", log)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn help_shows_no_internal_role_and_says_what_postgres_takes() -> anyhow::Result<()> {
    let (code, out, err) = demo(&["--help"], "error")?;
    assert_eq!(code, 0, "{out}{err}");
    let usage = out
        .lines()
        .find(|l| l.starts_with("Usage:"))
        .unwrap_or_default();
    assert_eq!(usage, "Usage: custody-demo [OPTIONS]", "{out}");
    for internal in ["worker", "--role", "Commands:"] {
        assert!(
            !out.contains(internal),
            "{internal} in user-facing help:\n{out}"
        );
    }
    assert!(
        out.contains("creates two fresh databases of its own"),
        "{out}"
    );
    assert!(out.contains("--keep"), "{out}");
    assert!(
        out.contains("--postgres <URL>") && out.contains("--nats <URL>"),
        "{out}"
    );
    Ok(())
}

#[test]
fn a_short_run_logs_plain_text_and_keep_leaves_the_databases() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("custody-demo-keep-{}", uuid::Uuid::now_v7()));
    // without --keep (and without --dir) the temporary directory goes away
    let (code, out, err) = demo(&["--messages", "20", "--seed", "7"], "info")?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !err.contains("\x1b["),
        "colour codes in a redirected log: {err:?}"
    );
    assert!(out.contains("custody demo — embedded SQLite"), "{out}");
    let removed = err
        .lines()
        .find(|l| l.starts_with("removed the SQLite directory "))
        .unwrap_or_default();
    assert!(
        removed.ends_with("(pass --keep to keep what the run created, for inspection)"),
        "{err}"
    );

    // with --keep: the databases stay, and where they are is printed
    let dir_s = dir.to_string_lossy().into_owned();
    let (code, out, err) = demo(
        &["--messages", "20", "--seed", "7", "--dir", &dir_s, "--keep"],
        "error",
    )?;
    let a = dir.join("orders.db");
    let b = dir.join("billing.db");
    let kept = a.exists() && b.exists();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 0, "{out}{err}");
    assert!(kept, "--keep removed the databases:\n{err}");
    assert!(err.contains("kept for inspection:"), "{err}");
    let (a, b) = (a.to_string_lossy(), b.to_string_lossy());
    assert!(
        err.contains(&format!(
            "  custody reconcile --producer {a} --consumer {b} --consumer-name billing --topic orders --settle 0s"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("  custody dlq list --db {b}")),
        "{err}"
    );
    assert!(err.contains("  custody trace "), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_postgres_url_naming_a_missing_database_says_how_to_fix_it() -> anyhow::Result<()> {
    // the server must be up for the database to be the problem
    let Some(probe) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    drop(probe);
    let missing = custody_testkit::unique_name("custody_no_such_db");
    let server = custody_testkit::postgres_server_url();
    let url = custody_scenario::services::with_database(&server, &missing);
    let (code, out, err) = demo(
        &["--postgres", &url, "--nats", &custody_testkit::nats_url()],
        "error",
    )?;
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains(&format!("database {missing:?} named in "))
            && err.contains("does not exist on that server"),
        "{err}"
    );
    assert!(err.contains(&format!("createdb {missing}")), "{err}");
    assert!(
        err.contains("creates its own fresh databases there"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    Ok(())
}
